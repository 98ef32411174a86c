"""
From an ``image_url`` to the encoded image bytes the engine decodes.

``data:`` URLs (base64) are always accepted: the image travels in the request, which the
body limit bounds. Anything that makes the server reach out is off unless the operator turns
it on, because a request could otherwise make the server fetch from hosts only it can reach
(``http(s)://``, with ``--allow-image-urls``) or read its files (``file://``, only inside
``--image-dir``, with ``..`` and symbolic links resolved before the check).
"""

import asyncio
import base64
import binascii
from dataclasses import dataclass
import os
import pathlib
from typing import Optional
import urllib.parse

from vlm_ros.serve.api_errors import bad_request

MIB = 1024 * 1024


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from, and how large they may be."""

    allow_http: bool = False
    image_dir: Optional[pathlib.Path] = None
    """Folder that ``file://`` URLs must resolve into (its real path); None: refused."""
    max_bytes: int = 20 * MIB
    """Largest encoded image fetched or read."""
    fetch_timeout_s: float = 10.0
    """Whole-fetch limit for an http(s) image (connect, headers and body together)."""


@dataclass(frozen=True)
class ImageRef:
    """One ``image_url`` of a request and where it was (for error messages)."""

    url: str
    where: str
    """E.g. ``messages[1].content[0]``."""


async def load(ref: ImageRef, policy: ImagePolicy, http_client=None) -> bytes:
    """Return the encoded bytes of ``ref``; raise a 400 ApiError naming what is wrong."""
    url = ref.url.strip()
    scheme = url.split(':', 1)[0].lower() if ':' in url else ''
    if scheme == 'data':
        return _data_url(url, ref.where, policy)
    if scheme in ('http', 'https'):
        if not policy.allow_http or http_client is None:
            raise bad_request(f'{ref.where}: image URLs over {scheme} are disabled on this '
                              'server; send the image in the request as a data: URL '
                              '(data:image/png;base64,...), or start vlm_serve with '
                              '--allow-image-urls', 'messages', 'image_url_not_allowed')
        return await _fetch(url, ref.where, policy, http_client)
    if scheme == 'file':
        if policy.image_dir is None:
            raise bad_request(f'{ref.where}: file:// image URLs are disabled on this server; '
                              'send the image as a data: URL, or start vlm_serve with '
                              '--image-dir DIR to serve files from DIR', 'messages',
                              'image_url_not_allowed')
        return await asyncio.get_running_loop().run_in_executor(
            None, _read_file, url, ref.where, policy)
    raise bad_request(f'{ref.where}: unsupported image URL scheme {scheme or "(none)"!r}; '
                      'send the image as a data: URL (data:image/png;base64,...)',
                      'messages', 'invalid_image_url')


def _data_url(url, where, policy):
    header, comma, payload = url.partition(',')
    if not comma:
        raise bad_request(f'{where}: malformed data: URL (no comma before the data)',
                          'messages', 'invalid_image_url')
    if not header.lower().endswith(';base64'):
        raise bad_request(f'{where}: data: URLs must be base64-encoded '
                          '(data:image/...;base64,...)', 'messages', 'invalid_image_url')
    # Some clients wrap long base64 lines; whitespace is not data.
    payload = ''.join(payload.split())
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_large(where, policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f'{where}: the data: URL is not valid base64 ({exc})', 'messages',
                          'invalid_image_url') from None
    if not data:
        raise bad_request(f'{where}: the data: URL holds no data', 'messages', 'invalid_image')
    return data


def _too_large(where, policy, source=''):
    limit = policy.max_bytes
    size = f'{limit / MIB:g} MiB' if limit >= MIB else f'{limit} bytes'
    return bad_request(f'{where}: the image{source} is larger than {size} (--max-body-mb)',
                       'messages', 'image_too_large')


def _host(url):
    """Return scheme and host of ``url`` only: its path or query may carry secrets."""
    parts = urllib.parse.urlsplit(url)
    return f'{parts.scheme}://{parts.hostname or ""}'


async def _fetch(url, where, policy, client):
    import httpx
    try:
        return await asyncio.wait_for(_download(url, where, policy, client),
                                      policy.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise bad_request(f'{where}: fetching the image from {_host(url)} took longer than '
                          f'{policy.fetch_timeout_s:g} s', 'messages', 'image_fetch_failed') \
            from None
    except httpx.HTTPError as exc:
        raise bad_request(f'{where}: cannot fetch the image from {_host(url)}: '
                          f'{type(exc).__name__}: {exc}', 'messages', 'image_fetch_failed') \
            from None


async def _download(url, where, policy, client):
    async with client.stream('GET', url) as response:
        if response.status_code != 200:
            raise bad_request(f'{where}: fetching the image from {_host(url)} failed: HTTP '
                              f'{response.status_code}', 'messages', 'image_fetch_failed')
        declared = response.headers.get('content-length', '')
        source = f' from {_host(url)}'
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(where, policy, source)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > policy.max_bytes:
                raise _too_large(where, policy, source)
            chunks.append(chunk)
    return b''.join(chunks)


def _read_file(url, where, policy):
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ('', 'localhost'):
        raise bad_request(f'{where}: file:// URLs must name a local path, not host '
                          f'{parts.netloc!r}', 'messages', 'invalid_image_url')
    name = urllib.parse.unquote(parts.path)
    if not name or '\x00' in name:
        raise bad_request(f'{where}: the file:// URL names no file', 'messages',
                          'invalid_image_url')
    root = str(policy.image_dir)
    # realpath resolves '..' and every symbolic link, so the check sees the file that
    # would be opened. A relative name (file:cat.png) is relative to the image folder.
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, real]) != root:
        # The same answer whether or not the file exists: nothing is learnt about the host.
        raise bad_request(f'{where}: {name} is outside the image directory; file:// URLs '
                          'must name files inside the folder given to --image-dir',
                          'messages', 'image_path_not_allowed')
    shown = os.path.relpath(real, root)
    if not os.path.exists(real):
        raise bad_request(f'{where}: no file {shown} in the image directory', 'messages',
                          'image_not_found')
    # Checked before opening: opening a FIFO or a device could block or never end.
    if not os.path.isfile(real):
        raise bad_request(f'{where}: {shown} in the image directory is not a regular file',
                          'messages', 'invalid_image_url')
    try:
        with open(real, 'rb') as f:
            if os.fstat(f.fileno()).st_size > policy.max_bytes:
                raise _too_large(where, policy)
            return f.read(policy.max_bytes + 1)
    except OSError as exc:
        raise bad_request(f'{where}: cannot read {shown} from the image directory: '
                          f'{exc.strerror}', 'messages', 'image_not_found') from None
