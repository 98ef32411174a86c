"""
Reading GGUF files without loading a model: header metadata and rows of one tensor.

The header walk is our own few dozen lines of ``struct``: asking a file for its architecture
then costs no import and stops before the tokenizer's arrays (gguf-py's reader parses all of
them, about a second for a 49k vocabulary). Dequantizing rows is gguf-py's, the ggml
project's own reader, which knows every block format llama.cpp writes.
"""

import logging
import os
import struct
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from vlm_ros.engine.errors import ModelFilesError

_LOG = logging.getLogger('vlm_ros.gguf_file')
MAGIC = b'GGUF'
_SCALAR = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q',
           12: 'd'}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class TensorInfo(NamedTuple):
    """Where one tensor's data lies: dims innermost first, ggml type, absolute file offset."""

    dims: Tuple[int, ...]
    ggml_type: int
    offset: int


class _Reader:
    """Sequential reads of a GGUF header with errors that name the file."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def read(self, fmt):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ModelFilesError(f'{self.path}: truncated GGUF header')
        return struct.unpack('<' + fmt, data)[0]

    def read_str(self):
        n = self.read('Q')
        if n > 1 << 24:
            raise ModelFilesError(f'{self.path}: corrupt GGUF header (string of {n} bytes)')
        return self.f.read(n).decode('utf-8', 'replace')

    def skip(self, vtype):
        if vtype in _SCALAR:
            self.f.seek(struct.calcsize(_SCALAR[vtype]), 1)
        elif vtype == _STRING:
            self.f.seek(self.read('Q'), 1)
        elif vtype == _ARRAY:
            etype, count = self.read('I'), self.read('Q')
            if etype in _SCALAR:
                self.f.seek(count * struct.calcsize(_SCALAR[etype]), 1)
            else:
                for _ in range(count):
                    self.skip(etype)
        else:
            raise ModelFilesError(f'{self.path}: corrupt GGUF header (value type {vtype})')


def _walk(path, wanted, with_tensors):
    """Return (metadata values of ``wanted``, tensor infos or None) of a GGUF file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFilesError(f'GGUF model not found: {path}')
    wanted = set(wanted)
    if with_tensors:
        wanted.add('general.alignment')
    found: Dict[str, object] = {}
    try:
        with open(path, 'rb') as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != MAGIC:
                raise ModelFilesError(f'{path} is not a GGUF file (bad magic {head[:4]!r})')
            version, n_tensors, n_kv = struct.unpack('<IQQ', head[4:])
            if version < 2:
                raise ModelFilesError(f'{path}: GGUF version {version} is too old')
            r = _Reader(f, path)
            # The tokenizer's arrays (often 100k+ strings) follow the general keys in every
            # converter's output; stop there unless a tokenizer key or the tensors are needed.
            stop_at_tokenizer = not with_tensors and not any(
                k.startswith('tokenizer.') for k in wanted)
            for _ in range(n_kv):
                key = r.read_str()
                if stop_at_tokenizer and key.startswith('tokenizer.'):
                    break
                vtype = r.read('I')
                if key in wanted and vtype == _STRING:
                    found[key] = r.read_str()
                elif key in wanted and vtype in _SCALAR:
                    found[key] = r.read(_SCALAR[vtype])
                else:
                    r.skip(vtype)
                if not with_tensors and wanted <= set(found):
                    break
            if not with_tensors:
                return found, None
            tensors = {}
            for _ in range(n_tensors):
                name = r.read_str()
                dims = tuple(r.read('Q') for _ in range(r.read('I')))
                tensors[name] = (dims, r.read('I'), r.read('Q'))
            alignment = int(found.get('general.alignment', _DEFAULT_ALIGNMENT))
            start = -(-f.tell() // alignment) * alignment
            return found, {name: TensorInfo(dims, kind, start + offset)
                           for name, (dims, kind, offset) in tensors.items()}
    except ModelFilesError:
        raise
    except OSError as exc:  # ModelFilesError is an OSError too: re-raised above as is
        raise ModelFilesError(f'cannot read {path}: {exc}') from exc


def read_metadata(path, keys=('general.architecture', 'general.type')) -> Dict[str, object]:
    """
    Read a few scalar metadata values from a GGUF header without loading the model.

    Raises ModelFilesError when the file is missing or not a GGUF file.
    """
    return _walk(path, keys, with_tensors=False)[0]


def read_tensor_infos(path) -> Dict[str, TensorInfo]:
    """Return every tensor's dims, type and data offset, reading only the header."""
    return _walk(path, (), with_tensors=True)[1]


class TensorRows:
    """
    Rows of a 2-D GGUF tensor as float32, dequantized on demand from the mapped file.

    Only the pages of the rows asked for are read, so the token embedding table of a 49k
    vocabulary costs a few KiB per prompt instead of its full float32 size (113 MB at 576
    wide).
    """

    def __init__(self, path, name, info: TensorInfo):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if len(info.dims) != 2:
            raise ValueError(f'{name} has {len(info.dims)} dims, not 2')
        self.qtype = GGMLQuantizationType(info.ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        self.width, self.count = int(info.dims[0]), int(info.dims[1])
        if self.width % block:
            raise ValueError(f'{name}: row width {self.width} is not whole {block}-blocks')
        self._rows = np.memmap(path, dtype=np.uint8, mode='r', offset=info.offset,
                               shape=(self.count, self.width // block * block_bytes))

    @classmethod
    def from_file(cls, path, name) -> Optional['TensorRows']:
        """Map tensor ``name`` of ``path``; None when it is absent or in a format gguf-py lacks."""
        try:
            info = read_tensor_infos(path).get(name)
            if info is None:
                return None
            rows = cls(path, name, info)
            rows([0])  # gguf-py raises NotImplementedError for block formats it cannot read
            return rows
        except (ImportError, KeyError, ValueError, NotImplementedError) as exc:
            _LOG.warning('cannot read %s rows of %s (%s: %s); llama.cpp gets the prompt as '
                         'token runs instead', name, os.path.basename(path),
                         type(exc).__name__, exc)
            return None

    def __call__(self, indices) -> np.ndarray:
        """Return rows ``indices`` as float32 [len(indices), width]."""
        raw = np.asarray(self._rows[np.asarray(indices, dtype=np.int64)])
        own = _DEQUANTIZE.get(self.qtype.name)
        if own is not None:
            return own(raw).reshape(-1, self.width)
        from gguf.quants import dequantize
        return np.array(dequantize(raw, self.qtype), dtype=np.float32).reshape(-1, self.width)


# Q8_0 and Q4_0 in numpy, as ggml lays them out (per 32 values: a float16 scale, then 32
# int8, or 16 bytes of 4-bit pairs, low nibbles first, offset 8). gguf-py's own readers of
# these two view a non-contiguous slice as float16, which numpy before 1.23 refuses (Ubuntu
# 22.04 / Humble robots run 1.21-1.26); the result is the same, value for value.
def _q8_0(raw):
    blocks = raw.reshape(-1, 34)
    scale = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
    return scale * np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)


def _q4_0(raw):
    blocks = raw.reshape(-1, 18)
    scale = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
    packed = blocks[:, 2:]
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8.0
    return scale * values


_DEQUANTIZE = {'Q8_0': _q8_0, 'Q4_0': _q4_0}
