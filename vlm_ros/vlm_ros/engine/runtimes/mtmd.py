"""
llama.cpp's own multimodal projector (an mmproj GGUF through libmtmd) as the image encoder.

``MtmdImageEncoder`` takes the rendered prompt text, one media marker per image, and RGB
images; libmtmd preprocesses and tiles the images, lays out the prompt's tokens around them
(tile markers included) and runs the projector; for an M-RoPE language model (Qwen2-VL) it
also gives each token its multi-axis position, as libmtmd's own decoding helper would.
``MtmdVision`` is the pipeline's vision stage
over it: the request it returns has ``input_ids`` with ``image_token_id`` where features go,
like a model family's, so it is prefilled by ``LlamaCppDecoder.start`` like ONNX features
are, and decoded token by token by the same ``LlamaCppSession``.
"""

import ctypes
from dataclasses import dataclass, field
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from vlm_ros.engine import gguf_file
from vlm_ros.engine.datatypes import PreparedRequest
from vlm_ros.engine.errors import (BackendError, ImageError, ModelFilesError,
                                   ModelMismatchError, UnsupportedModelError)
from vlm_ros.engine.runtimes import llamacpp
from vlm_ros.engine.runtimes.native import NativeResource

# Placeholders some vocabularies use for image positions, tried when none is given.
_IMAGE_TOKENS = ('<image>', '<IMG_CONTEXT>', '<|image_pad|>', '<image_soft_token>',
                 '<|vision_pad|>')
_CHUNK_TEXT, _CHUNK_IMAGE = 0, 1


def _mtmd():
    llamacpp.lib()
    from llama_cpp import mtmd_cpp  # deferred: loads libmtmd
    return mtmd_cpp


@dataclass
class MtmdRequest:
    """A prompt laid out by libmtmd, ready for ``LlamaCppDecoder.start``."""

    input_ids: np.ndarray
    """int64 [seq]: text tokens, ``image_token_id`` at every image position."""
    features: Optional[np.ndarray]
    """float32 [image tokens, hidden] in prompt order, or None without images."""
    image_token_id: int
    num_image_tokens: int
    positions: Optional[np.ndarray] = None
    """int64 [3, seq]: M-RoPE positions (temporal, height, width), None for others."""
    grids: List[Tuple[int, int]] = field(default_factory=list)
    """Per image: (columns, rows) of its grid of image tokens (M-RoPE projectors)."""


class MtmdImageEncoder(NativeResource):
    """
    An mmproj GGUF bound to a ``LlamaCppDecoder`` (libmtmd needs the text model).

    ``prepare(prompt, images)`` returns an ``MtmdRequest``. ``marker`` is the text that
    stands for an image in the prompt (``prepare`` can substitute a family's own
    placeholder, e.g. ``<image>``, for it). ``image_tokens`` (min, max) bounds the tokens
    of one image where the projector resizes to a token budget (Qwen2-VL: libmtmd's own
    8..4096 unless given; a model folder's processor config gives the model's own).
    """

    def __init__(self, mmproj_path, decoder: 'llamacpp.LlamaCppDecoder', n_threads: int = 0,
                 image_token_id: Optional[int] = None, flash_attn: Optional[bool] = None,
                 warmup: bool = True, image_tokens: Optional[Tuple[int, int]] = None):
        self._m = M = _mtmd()
        L = llamacpp.lib()
        self._ctx = None
        self.path = os.fspath(mmproj_path)
        self.decoder = decoder
        name = os.path.basename(self.path)
        meta = gguf_file.read_metadata(
            self.path, ('general.architecture', 'clip.projector_type',
                        'clip.vision.projector_type', 'clip.vision.patch_size',
                        'clip.vision.spatial_merge_size'))
        if meta.get('general.architecture') != 'clip':
            raise ModelFilesError(
                f'{name} is not a multimodal projector (architecture '
                f'{meta.get("general.architecture")!r}, expected \'clip\')')
        self.projector_type = str(meta.get('clip.projector_type')
                                  or meta.get('clip.vision.projector_type') or '')
        # Pixels per image token side (patch x merge; Qwen2-VL's merger joins 2x2 patches):
        # the size the model saw is the token grid times this.
        self.cell = int(meta.get('clip.vision.patch_size') or 14) * int(
            meta.get('clip.vision.spatial_merge_size') or 2)
        M.mtmd_log_set(llamacpp.log_callback(), None)
        M.mtmd_helper_log_set(llamacpp.log_callback(), None)
        params = M.mtmd_context_params_default()
        # The projector goes to the GPU when the language model's layers do.
        params.use_gpu = decoder.n_gpu_layers != 0
        params.print_timings = False
        params.warmup = warmup
        params.n_threads = n_threads if n_threads > 0 else (os.cpu_count() or 1)
        if image_tokens is not None:
            params.image_min_tokens, params.image_max_tokens = (int(n) for n in image_tokens)
        if flash_attn is not None:
            params.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        llamacpp.log_mark()
        self._ctx = M.mtmd_init_from_file(self.path.encode(), decoder._model, params)
        if not self._ctx:
            reason = llamacpp.recent_errors() or 'no reason given'
            error = ModelMismatchError if 'n_embd' in reason else ModelFilesError
            raise error(f'llama.cpp cannot load the projector {name}: {reason}')
        if not M.mtmd_support_vision(self._ctx):
            self.close()
            raise UnsupportedModelError(f'{name} has no vision encoder (audio only?)')
        self.mrope = bool(M.mtmd_decode_use_mrope(self._ctx))
        if self.mrope and decoder.n_pos == 1:
            self.close()
            raise ModelMismatchError(
                f'{name} places image tokens by multi-axis (M-RoPE) positions, but the '
                f'language model ({decoder.architecture}) takes one position per token')
        self.marker = (M.mtmd_get_marker(self._ctx) or M.mtmd_default_marker()).decode()
        self.image_token_id = (image_token_id if image_token_id is not None
                               else self._find_image_token())
        # libmtmd looks its template tokens up one by one; a vocabulary without a single
        # token for "\n\n" gets -1 where idefics3 wants that text (see _text_ids).
        self._newlines = decoder.tokenize('\n\n', parse_special=False)

    def _find_image_token(self):
        for text in _IMAGE_TOKENS:
            ids = self.decoder.tokenize(text)
            if len(ids) == 1:
                return ids[0]
        raise UnsupportedModelError(
            'no image placeholder token found in the vocabulary; pass image_token_id')

    def prepare(self, prompt: str, images: Sequence[np.ndarray],
                image_placeholder: Optional[str] = None,
                add_special: bool = False) -> MtmdRequest:
        """
        Tokenize ``prompt`` around ``images`` (RGB uint8 [H, W, 3]) and encode the images.

        ``image_placeholder`` (e.g. ``<image>``) is replaced by the media marker first; the
        prompt must hold one marker per image. ``add_special`` adds the vocabulary's BOS.
        """
        M = self._m
        if image_placeholder:
            prompt = prompt.replace(image_placeholder, self.marker)
        if prompt.count(self.marker) != len(images):
            raise ImageError(f'the prompt has {prompt.count(self.marker)} image markers '
                             f'({self.marker}) for {len(images)} images')
        bitmaps = [self._bitmap(image) for image in images]
        chunks = M.mtmd_input_chunks_init()
        try:
            text = M.mtmd_input_text()
            data = prompt.encode('utf-8')
            text.text = data
            text.text_len = len(data)
            text.add_special = add_special
            text.parse_special = True
            array = (ctypes.c_void_p * max(1, len(bitmaps)))(*bitmaps)
            llamacpp.log_mark()
            rc = M.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), array, len(bitmaps))
            if rc != 0:
                reason = llamacpp.recent_errors() or f'mtmd_tokenize returned {rc}'
                raise ImageError(f'libmtmd cannot lay out the prompt and images: {reason}')
            return self._collect(chunks)
        finally:
            M.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                M.mtmd_bitmap_free(bitmap)

    def _bitmap(self, image):
        rgb = np.asarray(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or not rgb.size:
            raise ImageError(f'expected an RGB uint8 image [H, W, 3], got {rgb.dtype} '
                             f'{rgb.shape}')
        rgb = np.ascontiguousarray(rgb)
        bitmap = self._m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                          rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        if not bitmap:
            raise ImageError('libmtmd cannot take the image')
        return bitmap

    def _collect(self, chunks):
        """Walk libmtmd's chunks: text ids, and projector output for image chunks."""
        M = self._m
        width = self.decoder.hidden_size
        ids: List[np.ndarray] = []
        features: List[np.ndarray] = []
        positions: List[np.ndarray] = []  # M-RoPE only: others take consecutive ones
        grids: List[Tuple[int, int]] = []
        at = 0  # the next position
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(chunk)
            if kind == _CHUNK_TEXT:
                ids.append(self._text_ids(chunk))
                if self.mrope:
                    positions.append(np.broadcast_to(
                        np.arange(at, at + ids[-1].size, dtype=np.int64), (3, ids[-1].size)))
                at += ids[-1].size
                continue
            if kind != _CHUNK_IMAGE:
                raise UnsupportedModelError('only image inputs are supported (got audio)')
            n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(M.mtmd_input_chunk_get_n_pos(chunk))
            if self.mrope:
                image = self._image_positions(M.mtmd_input_chunk_get_tokens_image(chunk), at, n)
                positions.append(image)
                # The token grid: columns and rows past the image's first position.
                grids.append((int(image[2].max()) - at + 1, int(image[1].max()) - at + 1))
            elif n_pos != n:
                raise UnsupportedModelError(f'{self.projector_type} images use '
                                            'positions unlike tokens (not supported)')
            at += n_pos
            if M.mtmd_decode_use_non_causal(self._ctx, chunk):
                # LlamaCppDecoder prefills every position causally.
                raise UnsupportedModelError(
                    f'the {self.projector_type} projector needs non-causal image attention, '
                    'which this engine does not feed')
            llamacpp.log_mark()
            rc = M.mtmd_encode_chunk(self._ctx, chunk)
            if rc != 0:
                reason = llamacpp.recent_errors() or f'mtmd_encode_chunk returned {rc}'
                raise BackendError(f'libmtmd failed to encode the image: {reason}')
            ptr = M.mtmd_get_output_embd(self._ctx)
            if not ptr:
                raise BackendError('libmtmd returned no image embeddings')
            features.append(np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n, width)).copy())
            ids.append(np.full(n, self.image_token_id, dtype=np.int64))
        input_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        stacked = np.concatenate(features) if features else None
        return MtmdRequest(input_ids, stacked, self.image_token_id,
                           0 if stacked is None else len(stacked),
                           np.concatenate(positions, axis=1) if positions else None, grids)

    def _image_positions(self, tokens, at, n):
        """Return the (temporal, height, width) positions of an image's ``n`` tokens."""
        get = self._m.mtmd_image_tokens_get_decoder_pos
        out = np.empty((3, n), dtype=np.int64)
        for i in range(n):
            pos = get(tokens, at, i)
            out[:, i] = pos.t, pos.y, pos.x
        return out

    def _text_ids(self, chunk):
        M = self._m
        count = ctypes.c_size_t()
        ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
        ids = np.ctypeslib.as_array(ptr, shape=(count.value,)).astype(np.int64) \
            if count.value else np.zeros(0, dtype=np.int64)
        if (ids < 0).any():
            if self.projector_type != 'idefics3':
                raise UnsupportedModelError(
                    f"libmtmd's {self.projector_type} template needs a token this "
                    'vocabulary does not have')
            # idefics3's only multi-character lookup is "\n\n" before the global image.
            parts = [[int(t)] if t >= 0 else self._newlines for t in ids]
            ids = np.array([t for part in parts for t in part], dtype=np.int64)
        return ids

    def close(self):
        """Free libmtmd's context (also done when garbage collected)."""
        if self._ctx:
            self._m.mtmd_free(self._ctx)
            self._ctx = None


class MtmdVision:
    """
    The pipeline's vision stage for libmtmd: lays out the prompt around the images and encodes.

    A family such as GgufChatFamily renders the prompt with a placeholder per image and leaves
    ``input_ids`` empty; this fills them in, because libmtmd decides how many tokens (and tile
    markers) each image takes.
    """

    encodes_per_image = False
    """libmtmd encodes the prompt's images itself, in one layout pass."""

    def __init__(self, encoder: MtmdImageEncoder, placeholder: str = '<image>',
                 fit_image: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.encoder = encoder
        self.placeholder = placeholder
        self.fit_image = fit_image
        """A family's own resize (its processor's filter and rounding), applied before
        libmtmd, which keeps an image already on its grid as it is (Qwen2-VL)."""

    def encode(self, request: PreparedRequest
               ) -> Tuple[PreparedRequest, Optional[np.ndarray]]:
        """Lay the prompt out and encode: ``(request with input_ids, features or None)``."""
        images = request.images if self.fit_image is None else \
            [self.fit_image(image) for image in request.images]
        laid_out = self.encoder.prepare(request.prompt_text, images,
                                        image_placeholder=self.placeholder)
        done = PreparedRequest(laid_out.input_ids, {}, laid_out.image_token_id,
                               laid_out.num_image_tokens, request.prompt_text, request.images,
                               positions=laid_out.positions,
                               seen_sizes=[(nx * self.encoder.cell, ny * self.encoder.cell)
                                           for nx, ny in laid_out.grids])
        return done, laid_out.features
