"""
What makes a follow-up question cheap: image features kept by content, prompts by prefix.

``FeatureCache`` keeps the vision encoder's output per image, keyed by a hash of the decoded
pixels (before any resizing) and the image options, in an LRU bounded in bytes; each
pipeline has its own, so the model is part of the key. ``PrefixKeys`` gives every prompt
position an identity that covers what fills it -- the token id for text, the content of the
image features for image positions (placeholder ids are the same for every image) -- so a
decoder can find the longest prefix it has already computed. The decoders keep those
prefixes (``kv_cache_slots``); see ``runtimes``.
"""

import collections
import hashlib
import threading
from typing import Optional

import numpy as np

from vlm_ros.engine.datatypes import ImageOptions

_IMAGE_KEY_BIT = np.int64(-(2 ** 63))  # image positions are negative, token ids are not


def image_key(rgb: np.ndarray, options: Optional[ImageOptions]) -> bytes:
    """Return the cache key of an RGB image under ``options``: its pixels, shape and options."""
    options = options or ImageOptions()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((rgb.shape, options.do_image_splitting, options.max_tiles)).encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.digest()


class FeatureCache:
    """An LRU of image features, at most ``max_bytes`` of them (0: keeps nothing)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key) -> Optional[np.ndarray]:
        """Return the features stored for ``key`` (marking them recent), or None."""
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key, features: np.ndarray):
        """Keep ``features`` (read-only from now on), dropping the oldest beyond the bound."""
        size = features.nbytes
        if size > self.max_bytes:
            return
        features.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes

    def clear(self):
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self):
        return len(self._items)


def prefix_keys(input_ids: np.ndarray, features: Optional[np.ndarray],
                image_token_id: Optional[int]) -> np.ndarray:
    """
    Return one int64 identity per prompt position.

    Text positions: the token id. Image positions: a hash of the features of their run of
    image positions (one image, or one tile block) combined with the offset in the run, as a
    negative number; so two prompts share a prefix only where the same features fill it.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    keys = ids.copy()
    if features is None or image_token_id is None or not len(features):
        return keys
    slots = ids == image_token_id
    if not slots.any():
        return keys
    rows = np.ascontiguousarray(features, dtype=np.float32).reshape(-1, features.shape[-1])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], slots.astype(np.int8), [0]])))
    used = 0
    for begin, end in zip(edges[::2], edges[1::2], strict=True):
        n = end - begin
        digest = hashlib.blake2b(rows[used:used + n].data, digest_size=8).digest()
        base = np.frombuffer(digest, dtype=np.int64)[0] & np.int64(2 ** 62 - 1)
        keys[begin:end] = (base + np.arange(n, dtype=np.int64)) | _IMAGE_KEY_BIT
        used += n
    return keys


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Return the length of the longest common prefix of two key arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
