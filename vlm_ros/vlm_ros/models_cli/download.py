"""
``vlm_models download``: fetch a configuration's files, check every byte, write parameters.

Per source repository the hub is asked once for its files at the catalogue's revision; the
commit that revision resolves to is recorded and every file is fetched from that commit, so
a folder is one consistent snapshot even if the repository moves on mid-download. Each file
is checked before it takes its place: its size, and the sha256 the hub publishes for LFS
files or the git blob id for files kept in git (plus the catalogue's pins, which must agree
with the hub). A file already in the folder is kept when it checks out; one in the Hugging
Face cache is copied rather than fetched. Offline (``HF_HUB_OFFLINE=1``) nothing is asked:
files in the folder are checked against the catalogue and the folder's manifest, missing
ones come from the cache or are reported.

Exit codes: 0 the folder is complete; 1 something failed (each failure is named); 3 every
hub file is there but a file that only ``vlm_models export`` makes is still missing.
"""

from dataclasses import dataclass
import fcntl
import json
import os
import pathlib
import shutil
import sys
from typing import Optional

from vlm_ros.models_cli import catalogue, hashing, hub, manifest, params_file, transfer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NEEDS_EXPORT = 3
SHARD_INDEX_SUFFIX = '.safetensors.index.json'
"""A checkpoint file with this suffix brings the weight shards its ``weight_map`` names."""


class MismatchError(ValueError):
    """A file's bytes are not the ones expected; the message has both values."""


@dataclass(frozen=True)
class Expected:
    """What a file must be: size and a digest, and who said so."""

    size: Optional[int]
    sha256: Optional[str]
    blob_id: Optional[str]
    """git blob sha1 of the content (files kept in git, not LFS)."""
    origin: str

    def key(self) -> str:
        """Return a name for these bytes (the partial download's suffix)."""
        return self.sha256 or self.blob_id or 'unknown'


def expectation(entry, remote=None, listing=None, recorded=None) -> Expected:
    """
    Combine the catalogue's pins with the hub's metadata (or the folder's manifest record).

    Raises MismatchError when the catalogue pins a size or sha256 the hub contradicts: the
    repository changed since the catalogue was written, and neither can be trusted blindly.
    """
    size = sha256 = blob_id = None
    origins = []
    if remote is not None:
        size, sha256 = remote.size, remote.sha256
        blob_id = None if remote.sha256 else remote.blob_id  # an LFS blob id is the pointer's
        origins.append(f'hub metadata of {listing.repo}@{listing.commit[:12]}')
    elif recorded:
        size, sha256 = recorded.get('size'), recorded.get('sha256')
        commit = recorded.get('commit')
        origins.append(f'{manifest.NAME}, from {recorded.get("repo")}'
                       + (f'@{commit[:12]}' if commit else ''))
    for name, pinned, known in (('size', entry.size, size), ('sha256', entry.sha256, sha256)):
        if pinned is not None and known is not None and pinned != known:
            raise MismatchError(f'{entry.path}: the catalogue pins {name} {pinned} but the '
                                f'{origins[0]} says {known}')
    if entry.size is not None or entry.sha256 is not None:
        size = entry.size if entry.size is not None else size
        sha256 = entry.sha256 or sha256
        origins.insert(0, 'the catalogue')
    return Expected(size, sha256, blob_id, ' and '.join(origins) or 'nothing')


def check(path, expected) -> str:
    """Return what matched (e.g. 'sha256 ok'); raise MismatchError with both values if not."""
    path = pathlib.Path(path)
    actual_size = path.stat().st_size
    if expected.size is not None and actual_size != expected.size:
        raise MismatchError(f'size {actual_size} bytes, expected {expected.size} '
                            f'({expected.origin})')
    sha256, blob_id = hashing.digests(path)
    if expected.sha256:
        if sha256 != expected.sha256:
            raise MismatchError(f'sha256 {sha256}, expected {expected.sha256} '
                                f'({expected.origin})')
        return 'sha256 ok'
    if expected.blob_id:
        if blob_id != expected.blob_id:
            raise MismatchError(f'git blob sha1 {blob_id}, expected {expected.blob_id} '
                                f'({expected.origin})')
        return 'git blob sha1 ok'
    return 'size ok, no hash known' if expected.size is not None else 'no size or hash known'


class Run:
    """One ``download``: the folder, what was done and what failed."""

    def __init__(self, configuration, folder, retries=3, out=sys.stdout):
        """Fetch ``configuration`` into ``folder``, retrying cut connections ``retries`` times."""
        self.config = configuration
        self.folder = pathlib.Path(folder).expanduser().resolve()
        self.retries = retries
        self.out = out
        self.failures = []
        self.records = {}
        self.sources = []
        self.headers = None

    def say(self, text):
        """Print a progress line."""
        print(text, file=self.out, flush=True)

    def fail(self, text):
        """Record and print a failure (the run goes on with the other files)."""
        self.failures.append(text)
        print(f'vlm_models: error: {text}', file=sys.stderr, flush=True)

    def fetch_sources(self, include_checkpoint=False):
        """
        Fetch every source's files (and the exporter's checkpoint files when asked).

        A checkpoint ``*.safetensors.index.json`` is fetched first, then the shards its
        ``weight_map`` names, so the catalogue need not know how a checkpoint was sharded.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(self.config.sources):
            entries = list(source.files)
            if include_checkpoint and i == 0:
                entries += list(self.config.checkpoint)
            if hub.offline():
                self._offline_source(source, entries)
            else:
                self._online_source(source, entries)

    def _shard_entries(self, entries):
        """Return the shards named by the index files among ``entries``, not listed there."""
        listed = {e.path for e in entries}
        return [catalogue.FileEntry(path) for path in checkpoint_shards(self.folder, entries)
                if path not in listed]

    def _online_source(self, source, entries):
        try:
            listing = hub.list_files(source.repo, source.revision)
        except hub.HubError as exc:
            self.fail(str(exc))
            return
        self.sources.append({'repo': source.repo, 'revision': source.revision,
                             'commit': listing.commit})
        self.say(f'{source.repo} @ {source.revision} = {listing.commit[:12]} '
                 f'({len(entries)} files asked for)')
        for entry in entries:
            self._online_entry(source, listing, entry)
        shards = self._shard_entries(entries)
        if shards:
            self.say(f'  {len(shards)} weight shard(s) named by the checkpoint index')
        for entry in shards:
            self._online_entry(source, listing, entry)

    def _online_entry(self, source, listing, entry):
        remote = listing.files.get(entry.path)
        if remote is None:
            if entry.optional:
                self.say(f'  {entry.path}: not in the repository (optional), skipped')
            else:
                self.fail(f'{entry.path} is not in {source.repo}@{listing.commit[:12]} '
                          f'({len(listing.files)} files there)')
            return
        try:
            expected = expectation(entry, remote, listing)
        except MismatchError as exc:
            self.fail(str(exc))
            return
        self._one_file(source.repo, listing.commit, entry.path, expected)

    def _offline_source(self, source, entries):
        self.say(f'{source.repo} @ {source.revision}: offline (HF_HUB_OFFLINE), checking '
                 'local files only')
        recorded = manifest.read(self.folder).get('files', {})
        for entry in entries:
            self._offline_entry(source, recorded, entry)
        for entry in self._shard_entries(entries):
            self._offline_entry(source, recorded, entry)

    def _offline_entry(self, source, recorded, entry):
        dest = self.folder / entry.path
        try:
            expected = expectation(entry, recorded=recorded.get(entry.path))
        except MismatchError as exc:
            self.fail(str(exc))
            return
        if dest.is_file():
            self._keep(dest, entry.path, expected, source.repo,
                       recorded.get(entry.path, {}).get('commit'))
            return
        cached = hub.cached_copy(source.repo, entry.path, source.revision)
        if cached is None:
            if not entry.optional:
                self.fail(f'{entry.path}: offline (HF_HUB_OFFLINE=1) and neither in '
                          f'{self.folder} nor in the Hugging Face cache for '
                          f'{source.repo}@{source.revision}')
            return
        self._install(pathlib.Path(cached), dest, entry.path, expected, source.repo,
                      None, 'copied from the Hugging Face cache', copy=True)

    def _one_file(self, repo, commit, path, expected):
        dest = self.folder / path
        if dest.is_file():
            try:
                how = check(dest, expected)
            except MismatchError as exc:
                self.say(f'  {path}: present but {exc}; fetching it again')
            else:
                self._record(path, dest, repo, commit)
                self.say(f'  {path}: present, {how}')
                return
        cached = hub.cached_copy(repo, path, commit)
        if cached is not None and _matches(pathlib.Path(cached), expected):
            self._install(pathlib.Path(cached), dest, path, expected, repo, commit,
                          'copied from the Hugging Face cache', copy=True)
            return
        part = transfer.part_path(self.folder, path, expected.key())
        resumed = part.stat().st_size if part.exists() else 0
        if self.headers is None:
            self.headers = hub.request_headers()
        try:
            fetched = transfer.fetch(hub.file_url(repo, path, commit), part, expected.size,
                                     self.headers, retries=self.retries,
                                     progress=_progress(path))
        except transfer.TransferError as exc:
            self.fail(f'{path} from {repo}: {exc}')
            return
        how = f'fetched {fetched} bytes' + (f' (resumed at byte {resumed})' if resumed else '')
        self._install(part, dest, path, expected, repo, commit, how)

    def _install(self, source_path, dest, path, expected, repo, commit, how, copy=False):
        """Check ``source_path`` and move (or copy) it to ``dest``; False when it failed."""
        if copy:
            part = transfer.part_path(self.folder, path, expected.key())
            part.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_path, part)
            source_path = part
        try:
            verdict = check(source_path, expected)
        except MismatchError as exc:
            source_path.unlink()
            self.fail(f'{path} from {repo}: {exc}; the damaged copy was deleted, run the '
                      'command again to fetch it anew')
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source_path, dest)
        self._record(path, dest, repo, commit)
        self.say(f'  {path}: {how}, {verdict}')
        return True

    def _keep(self, dest, path, expected, repo, commit):
        try:
            verdict = check(dest, expected)
        except MismatchError as exc:
            self.fail(f'{path}: {exc}')
            return
        self._record(path, dest, repo, commit)
        self.say(f'  {path}: present, {verdict}')

    def _record(self, path, dest, repo, commit):
        sha256, blob_id = hashing.digests(dest)
        self.records[path] = {'repo': repo, 'commit': commit, 'size': dest.stat().st_size,
                              'sha256': sha256, 'git_blob_sha1': blob_id}

    def save_manifest(self):
        """Record what arrived (kept even when other files failed, for the next run)."""
        if self.records or self.sources:
            manifest.update(self.folder, self.config.name, self.records,
                            self.sources or None)

    def missing_products(self):
        """Return the exported files the folder still lacks."""
        return [p for p in self.config.products if not (self.folder / p.path).is_file()]


def run(configuration, folder, params_out=None, retries=3, out=sys.stdout) -> int:
    """Download ``configuration`` into ``folder``; return the exit code (see the module)."""
    if not configuration.needs_files():
        print(f'{configuration.name}: nothing to download. {configuration.notes}', file=out)
        return EXIT_OK
    job = Run(configuration, folder, retries, out)
    job.say(f'{configuration.name} -> {job.folder}')
    with _locked(job.folder):
        job.fetch_sources()
        job.save_manifest()
    if job.failures:
        print(f'vlm_models: download of {configuration.name} failed: {len(job.failures)} '
              'problem(s), listed above', file=sys.stderr)
        return EXIT_FAILED
    written = params_file.write(configuration, job.folder,
                                params_out or params_file.default_path(job.folder,
                                                                       configuration))
    job.say(f'parameters: {written}')
    missing = job.missing_products()
    if missing:
        names = ', '.join(p.path for p in missing)
        print(f'vlm_models: {configuration.name} still needs {names}, which no hub '
              f'publishes: run `vlm_models export {configuration.name} --dir {job.folder}` '
              'on a machine with PyTorch (or copy the file made there into the folder)',
              file=sys.stderr)
        return EXIT_NEEDS_EXPORT
    job.say(f'{configuration.name}: complete in {job.folder}')
    return EXIT_OK


def checkpoint_shards(folder, entries):
    """
    Return the weight files named by the ``*.safetensors.index.json`` among ``entries``.

    Only indexes already in ``folder`` are read (sorted shard names, each once); a shard
    name that would leave the folder is refused, since the index comes from the hub.
    """
    shards = []
    for entry in entries:
        path = pathlib.Path(folder) / entry.path
        if not entry.path.endswith(SHARD_INDEX_SUFFIX) or not path.is_file():
            continue
        try:
            weight_map = json.loads(path.read_text(encoding='utf-8')).get('weight_map')
        except (OSError, ValueError, AttributeError) as exc:
            raise RuntimeError(f'{path} is not a safetensors index: {exc}') from exc
        if not isinstance(weight_map, dict):
            raise RuntimeError(f'{path} has no weight_map')
        base = pathlib.PurePosixPath(entry.path).parent
        for name in sorted(set(map(str, weight_map.values()))):
            shard = base / name
            if name.startswith('/') or '..' in pathlib.PurePosixPath(name).parts:
                raise RuntimeError(f'{path} names a shard outside the folder: {name!r}')
            if str(shard) not in shards:
                shards.append(str(shard))
    return shards


def _matches(path, expected):
    """Whether ``path`` holds the expected bytes (a cache copy worth taking)."""
    try:
        check(path, expected)
    except (MismatchError, OSError):
        return False
    return True


class _locked:
    """Hold an exclusive lock on the folder's download state (one writer at a time)."""

    def __init__(self, folder):
        self.path = pathlib.Path(folder) / transfer.PART_DIR / 'lock'

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, 'w')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.file.close()
            raise RuntimeError(f'another vlm_models command is writing to '
                               f'{self.path.parents[2]}') from exc
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _progress(path):
    """Return a progress callback that redraws one line on a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    state = {'shown': -1}

    def show(done, size):
        if not size:
            return
        percent = int(100 * done / size)
        if percent != state['shown']:
            state['shown'] = percent
            end = '\n' if done >= size else ''
            print(f'\r  {path}: {percent:3d}% of {size / 1e6:.1f} MB', end=end,
                  file=sys.stderr, flush=True)
    return show
