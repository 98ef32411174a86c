r"""
The two digests the hub publishes for a file, computed over a local copy.

LFS files (weights, graphs) carry the sha256 of their content; small files kept in git carry
the git blob id: sha1 over ``b'blob <size>\\0'`` followed by the content. Both are streamed,
so a multi-gigabyte file costs no memory.
"""

import hashlib
import os

CHUNK = 1 << 20


def digests(path):
    """Return ``(sha256, git blob sha1)`` hex digests of the file at ``path``, in one pass."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b'blob %d\0' % os.path.getsize(path))  # noqa: S324 (git's own id)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(CHUNK), b''):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()
