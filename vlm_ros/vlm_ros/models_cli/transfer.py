"""
One file over HTTP, resumable across connections and across runs.

The bytes go to ``<folder>/.cache/vlm_models/<path>.<hash>.part``, which outlives a cut
connection and a killed process: the next attempt -- in this run, or the next ``vlm_models
download`` -- asks for the rest with a ``Range`` request. huggingface_hub's own downloader
resumes only within one call in recent releases (2.4 writes a per-process temporary file and
deletes it on failure), so a robot on a flaky link would start a multi-gigabyte file over
each time; this keeps the partial file. The part is named after the expected hash, so bytes
of an older version of a file are never continued with a newer one. A part file is only
renamed into place by the caller, after its hash matched.
"""

import os
import pathlib
import sys
import time

import httpx

PART_DIR = pathlib.Path('.cache') / 'vlm_models'


class TransferError(RuntimeError):
    """The file could not be fetched; the message says what was kept and what to do."""


def part_path(folder, path, key) -> pathlib.Path:
    """Return where the partial download of ``path`` (expected hash ``key``) is kept."""
    return pathlib.Path(folder) / PART_DIR / f'{path}.{key[:16]}.part'


def fetch(url, part, size, headers, retries=3, timeout=10.0, progress=None):
    """
    Complete ``part`` from ``url`` until it holds ``size`` bytes; raise TransferError.

    A cut connection, a timeout or a server error while streaming is retried ``retries``
    times, each time from the bytes already kept; after that the part file stays for the
    next run. A server that ignores ``Range`` (answers 200) makes the part start over.
    ``progress(done, size)`` is called as bytes arrive. Returns the bytes fetched now.
    """
    part = pathlib.Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    fetched = 0
    attempt = 0
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout)) as client:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()  # longer than the file: not a prefix of it
                have = 0
            if size is not None and have == size:
                return fetched
            try:
                fetched += _stream(client, url, part, have, size, headers, progress)
                if size is None:
                    return fetched
                have = part.stat().st_size
                if have == size:
                    return fetched
                error = f'the connection closed after {have} of {size} bytes'
            except httpx.HTTPStatusError as exc:
                status = exc.response.status_code
                if status == 416 and have:  # the range is past the end: start over
                    part.unlink()
                    continue
                if status < 500 and status not in (408, 429):
                    raise TransferError(f'the server answered {status} for {url}') from exc
                error = f'the server answered {status}'
            except httpx.TransportError as exc:
                error = f'{type(exc).__name__}: {exc}'
            have = part.stat().st_size if part.exists() else 0
            attempt += 1
            if attempt > retries:
                total = f' of {size}' if size is not None else ''
                raise TransferError(
                    f'network error ({error}); {have}{total} bytes are kept in {part}: run '
                    'the same command again to resume')
            _note(f'  {error}; resuming at byte {have} (retry {attempt} of {retries})')
            time.sleep(min(0.5 * attempt, 5.0))


def _stream(client, url, part, have, size, headers, progress):
    """Append the bytes from ``have`` on to ``part``; return how many arrived."""
    request_headers = dict(headers)
    if have:
        request_headers['Range'] = f'bytes={have}-'
    got = 0
    with client.stream('GET', url, headers=request_headers) as response:
        response.raise_for_status()
        if have and response.status_code != 206:
            have = 0  # the server sent the whole file: keep none of the old part
        with open(part, 'ab' if have else 'wb') as f:
            # No chunk size: httpx would hold up to that many bytes back, and a cut
            # connection would lose them; network-sized pieces are written as they come.
            for chunk in response.iter_bytes():
                f.write(chunk)
                got += len(chunk)
                if progress is not None:
                    progress(have + got, size)
            f.flush()
            os.fsync(f.fileno())
    return got


def _note(text):
    print(text, file=sys.stderr, flush=True)
