"""
ONNX Runtime: vision encoder, token embedder and KV-cache decoder graphs.

Works on the three-graph layout of the Hugging Face ONNX exports (``vision_encoder``,
``embed_tokens``, ``decoder_model_merged``) in any precision: names, dtypes and cache shapes
are read from the graphs, never assumed. The KV cache stays in ONNX Runtime's own buffers
between steps (``run_with_ort_values``), so a decode step copies only the logits out.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlm_ros.engine.caches import common_prefix, prefix_keys
from vlm_ros.engine.datatypes import PreparedRequest
from vlm_ros.engine.errors import (Cancelled, ModelFilesError, ModelMismatchError,
                                   PromptTooLongError, UnsupportedModelError)
from vlm_ros.engine.generation import DecoderSession

_ORT_TYPES = {
    'tensor(float)': np.float32,
    'tensor(float16)': np.float16,
    'tensor(double)': np.float64,
    'tensor(int64)': np.int64,
    'tensor(int32)': np.int32,
    'tensor(bool)': np.bool_,
    'tensor(uint8)': np.uint8,
}
_LOG = logging.getLogger('vlm_ros.onnx')
PAST_PREFIX = 'past_key_values.'
PREFILL_CHUNK = 512
"""Prompt positions per decoder run (llama.cpp's default batch size too)."""


def _ort():
    import onnxruntime  # deferred: importing the engine must not load every runtime
    return onnxruntime


class SessionOptions:
    """Threads and execution providers for every session a pipeline creates."""

    def __init__(self, n_threads: int = 0, providers: Optional[Sequence[str]] = None):
        self.n_threads = n_threads if n_threads > 0 else (os.cpu_count() or 1)
        self.providers = list(providers) if providers else ['CPUExecutionProvider']

    def create(self, path, mem_pattern: bool = True, spinning: bool = True,
               n_threads: Optional[int] = None, graph_path=None):
        """
        Open ``path`` as an InferenceSession, with a clear error when it cannot be.

        ``graph_path``: a rewritten copy of ``path``'s graph, loaded instead of the file.

        ``mem_pattern`` False keeps ONNX Runtime from planning one block for all activations
        after the first run: for a graph run again and again at one shape (the vision
        encoder) that block comes on top of what its arena already holds from the first run.
        ``spinning`` False lets the session's worker threads sleep as soon as a run ends.
        Each session has its own pool, and a pool left spinning takes cores from whatever
        runs next (the decoder's pool, llama.cpp's threads, the ROS executor). SmolVLM2-256M
        on 2 cores with the vision encoder's spinning off: prefill after it 136 -> 85 ms
        (ONNX fp32), 63 -> 33 ms (int8), 146 -> 104 ms (llama.cpp Q8_0). Only the decoder,
        run step after step, gains from spinning (int8 TPOT 9.4 ms with it, 12.5 without).
        ``n_threads`` overrides the pipeline's thread count for this session.
        """
        ort = _ort()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelFilesError(f'ONNX model not found: {path}')
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads or self.n_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_mem_pattern = mem_pattern
        if not spinning:
            options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        available = set(ort.get_available_providers())
        providers = [p for p in self.providers if p in available] or ['CPUExecutionProvider']
        missing = [p for p in self.providers if p not in available]
        if missing:
            _LOG.warning('ONNX Runtime execution providers %s are not available in this '
                         'onnxruntime build (it has %s); %s uses %s', missing,
                         sorted(available), os.path.basename(path), providers)
        try:
            return ort.InferenceSession(os.fspath(graph_path or path), sess_options=options,
                                        providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelFilesError(f'cannot load ONNX model {path}: {exc}') from exc


class GraphIO:
    """Input and output names, dtypes and shapes of one session."""

    def __init__(self, session, path):
        self.path = os.fspath(path)
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def dtype(self, name):
        """Numpy dtype the graph declares for input ``name``."""
        ort_type = self.inputs[name].type
        if ort_type not in _ORT_TYPES:
            raise UnsupportedModelError(f'{self.path}: input {name} has type {ort_type}')
        return _ORT_TYPES[ort_type]

    def require(self, known, required):
        """Check the graph's inputs against the names this runtime knows how to feed."""
        names = set(self.inputs)
        unknown = sorted(n for n in names if n not in known and not n.startswith(PAST_PREFIX))
        if unknown:
            raise UnsupportedModelError(
                f'{os.path.basename(self.path)} has inputs this engine does not know: '
                f'{unknown} (known: {sorted(known)})')
        missing = sorted(set(required) - names)
        if missing:
            raise UnsupportedModelError(
                f'{os.path.basename(self.path)} lacks required inputs {missing}; '
                f'it has {sorted(names)}')


class OnnxVisionEncoder:
    """
    The vision stage on ONNX Runtime: runs a vision encoder graph on a family's inputs.

    Frames (tiles) go through the graph one at a time: its activations grow with the frames
    it sees at once (SmolVLM2's SigLIP at 17 tiles: 4.7 GB peak RSS in one run, 1.05 GB tile
    by tile) and the features are the same.

    With the encoder's ``num_heads`` and ``hidden_size`` its attention layers run fused
    (``onnx_attention``); frames with padded pixels then run on the graph as exported,
    loaded when the first one comes.
    """

    encodes_per_image = True
    """Features come image by image (``PreparedRequest.image_features``): a cache can hold them."""

    def __init__(self, path, options: SessionOptions, hidden_size: int, num_heads: int = 0,
                 vision_hidden_size: int = 0):
        self._path, self._options, self._exported = path, options, None
        self.fused = self._fuse(path, num_heads, vision_hidden_size)
        self.session = self._create_fused() if self.fused else None
        if self.session is None:
            self.fused = None
            self.session = self._exported = self._create()
        # Activations go back to the system after each run instead of staying in the arena
        # while the decoder answers (SigLIP at 512 px: ~120 MB kept otherwise).
        self._run_options = _ort().RunOptions()
        self._run_options.add_run_config_entry('memory.enable_memory_arena_shrinkage',
                                               'cpu:0')
        self.io = GraphIO(self.session, path)
        if not self.io.inputs:
            raise UnsupportedModelError(f'{path} has no inputs')
        out = self.session.get_outputs()[0]
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int) and width != hidden_size:
            raise ModelMismatchError(
                f'{os.path.basename(path)} produces features of width {width}, but the '
                f'language model expects {hidden_size} (files from different models?)')
        self.hidden_size = hidden_size

    def _create(self, graph_path=None):
        return self._options.create(self._path, mem_pattern=False, spinning=False,
                                    graph_path=graph_path)

    def _create_fused(self):
        try:
            return self._create(self.fused.path)
        except ModelFilesError as exc:  # e.g. an ONNX Runtime without the fused operator
            _LOG.warning('%s: the fused graph does not load (%s); running it as exported',
                         os.path.basename(self._path), exc)
            return None
        finally:
            self.fused.remove()

    def _fuse(self, path, num_heads, vision_hidden_size):
        from vlm_ros.engine.runtimes import onnx_attention
        if not os.path.isfile(path):
            return None  # create() says so
        try:
            fused = onnx_attention.fuse_file(path, num_heads, vision_hidden_size)
        except Exception as exc:  # noqa: B902 -- a graph it cannot read loads as exported
            _LOG.warning('%s: attention not fused (%s: %s)', os.path.basename(path),
                         type(exc).__name__, exc)
            return None
        if fused is not None:
            _LOG.info('%s: %d attention layers fused', os.path.basename(path), fused.layers)
        return fused

    def exported_session(self):
        """Return the session of the graph as exported (the fused one's fallback), loaded once."""
        if self._exported is None:
            self._exported = self._create()
        return self._exported

    def encode(self, request: PreparedRequest
               ) -> Tuple[PreparedRequest, Optional[np.ndarray]]:
        """
        Encode the request's images: ``(request, features [tokens, hidden] or None)``.

        Images whose features the request already holds (``image_features``, from a cache)
        are not encoded again; the others are, one image at a time, and their features are
        filled into ``request.image_features``.
        """
        if not request.image_inputs:  # a request laid out without per-image inputs
            return request, self.run(request.vision_inputs) if request.vision_inputs else None
        known = list(request.image_features) or [None] * len(request.image_inputs)
        for i, inputs in enumerate(request.image_inputs):
            if known[i] is None:
                known[i] = self.run(inputs)
        request.image_features = known
        return request, np.concatenate(known) if known else None

    def run(self, vision_inputs: Dict[str, np.ndarray]) -> np.ndarray:
        """Return float32 features [tokens, hidden] for a family's ``vision_inputs``."""
        unknown = sorted(set(self.io.inputs) - set(vision_inputs))
        if unknown:
            raise UnsupportedModelError(
                f'{os.path.basename(self.io.path)} wants inputs {unknown} that the model '
                f'family does not produce (it produces {sorted(vision_inputs)})')
        feed = {name: np.ascontiguousarray(vision_inputs[name], dtype=self.io.dtype(name))
                for name in self.io.inputs}
        # The frame axis: [batch, frames, 3, H, W] (Idefics3) or [tiles, 3, H, W] (InternVL);
        # every input must have the same count there, else the graph gets the whole feed.
        pixels = feed.get('pixel_values')
        axis = {5: 1, 4: 0}.get(getattr(pixels, 'ndim', 0))
        count = pixels.shape[axis] if axis is not None else 0
        if axis is None or count <= 1 or any(
                v.ndim <= axis or v.shape[axis] != count for v in feed.values()):
            return self._run(feed)
        parts = []
        for frame in range(count):
            index = (slice(None),) * axis + (slice(frame, frame + 1),)
            parts.append(self._run({n: np.ascontiguousarray(v[index]) for n, v in feed.items()}))
        return np.concatenate(parts)

    def _run(self, feed):
        session = self.session
        if self.fused is not None and not all(
                np.all(feed[name]) for name in self.fused.mask_inputs if name in feed):
            session = self.exported_session()  # padded pixels: the mask matters
        features = session.run([self.io.outputs[0]], feed, self._run_options)[0]
        features = np.asarray(features, dtype=np.float32)
        return features.reshape(-1, features.shape[-1])


class OnnxDecoder:
    """
    Token embedder plus merged KV-cache decoder; one instance serves many requests.

    ``kv_cache_slots`` > 0 keeps the KV cache of that many recent sequences (prompt and
    answer, stored by ``keep``); ``start`` begins from the longest prefix one of them shares
    with the new prompt (its cache cut to that length) and prefills only the rest.
    """

    KNOWN_INPUTS = {'inputs_embeds', 'attention_mask', 'position_ids', 'num_logits_to_keep',
                    'logits_to_keep', 'use_cache_branch'}

    def __init__(self, embed_path, decoder_path, options: SessionOptions, *, hidden_size,
                 num_layers, context_length, kv_cache_slots: int = 0):
        self.kv_cache_slots = max(0, int(kv_cache_slots))
        self._kept: List[Tuple[np.ndarray, list]] = []  # (keys, past), most recent last
        # A row lookup (Gather, and DequantizeLinear of the rows in int8 exports): a thread
        # pool would only add hand-offs, and spin between the decoder's steps.
        self.embed = options.create(embed_path, n_threads=1)
        self.session = options.create(decoder_path)
        self.embed_io = GraphIO(self.embed, embed_path)
        self.io = GraphIO(self.session, decoder_path)
        self.embed_io.require({'input_ids'}, {'input_ids'})
        self.io.require(self.KNOWN_INPUTS, {'inputs_embeds', 'attention_mask'})
        self.context_length = context_length
        self.hidden_size = hidden_size
        self._check_shapes(embed_path, decoder_path, hidden_size, num_layers)
        self.embeds_dtype = self.io.dtype('inputs_embeds')
        self.logits_name = 'logits' if 'logits' in self.io.outputs else self.io.outputs[0]

    def _check_shapes(self, embed_path, decoder_path, hidden_size, num_layers):
        name = os.path.basename(decoder_path)
        width = self.io.inputs['inputs_embeds'].shape[-1]
        if isinstance(width, int) and width != hidden_size:
            raise ModelMismatchError(f'{name} takes embeddings of width {width}, but the model '
                                     f'config says hidden_size {hidden_size}')
        embed_width = self.embed.get_outputs()[0].shape[-1]
        if isinstance(embed_width, int) and embed_width != hidden_size:
            raise ModelMismatchError(
                f'{os.path.basename(embed_path)} makes embeddings of width {embed_width}, but '
                f'the model config says hidden_size {hidden_size}')
        self.past_names: List[str] = []
        layers = 0
        while f'{PAST_PREFIX}{layers}.key' in self.io.inputs:
            self.past_names += [f'{PAST_PREFIX}{layers}.key', f'{PAST_PREFIX}{layers}.value']
            layers += 1
        if layers == 0:
            raise UnsupportedModelError(f'{name} has no past_key_values inputs: a decoder '
                                        'without KV cache is not supported')
        if num_layers and layers != num_layers:
            raise ModelMismatchError(f'{name} has a KV cache for {layers} layers, but the '
                                     f'model config says {num_layers} layers')
        self.present_names = [n.replace(PAST_PREFIX, 'present.') for n in self.past_names]
        missing = [n for n in self.present_names if n not in self.io.outputs]
        if missing:
            raise UnsupportedModelError(f'{name} lacks outputs {missing[:2]}...')
        key = self.io.inputs[self.past_names[0]]
        self.kv_dtype = self.io.dtype(self.past_names[0])
        self.kv_heads, self.head_dim = key.shape[1], key.shape[3]
        if not (isinstance(self.kv_heads, int) and isinstance(self.head_dim, int)):
            raise UnsupportedModelError(f'{name}: KV cache heads and head size must be static '
                                        f'in the graph (got shape {key.shape})')

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """Embeddings [seq, hidden] in the decoder's input dtype."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        out = self.embed.run(None, {'input_ids': ids})[0]
        return out[0].astype(self.embeds_dtype, copy=False)

    def start(self, input_ids, image_features=None, image_token_id=None, should_stop=None,
              positions=None):
        """
        Prefill the prompt; returns (session, logits [1, vocab] of the last position).

        A prompt longer than PREFILL_CHUNK positions runs in chunks of that many (its
        activations stay bounded); ``should_stop`` is polled between them and ``Cancelled``
        raised when it returns True. Multi-axis (M-RoPE) ``positions`` are refused: the
        exported decoders take one position per token.
        """
        if positions is not None:
            raise UnsupportedModelError(
                'this prompt places tokens by multi-axis (M-RoPE) positions, which the ONNX '
                'decoder does not take: run the language model in llama.cpp (a GGUF decoder)')
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if ids.size + 1 > self.context_length:
            raise PromptTooLongError(
                f'prompt of {ids.size} tokens leaves no room in the {self.context_length}-token '
                'context; shorten the prompt or disable image splitting')
        embeds = self.embed_tokens(ids)
        if image_features is not None and len(image_features):
            slots = np.flatnonzero(ids == image_token_id)
            if slots.size != len(image_features):
                raise ModelMismatchError(
                    f'the prompt has {slots.size} image tokens but the vision encoder produced '
                    f'{len(image_features)} features: image_seq_len in the processor config '
                    'does not match the vision encoder')
            embeds = embeds.copy()
            embeds[slots] = image_features.astype(embeds.dtype, copy=False)
        session = OnnxDecoderSession(self)
        session.prompt_keys = keys = prefix_keys(ids, image_features, image_token_id)
        done, past = self._longest_kept(keys)
        if done:
            # The kept cache cut to the shared prefix: a copy, the kept one stays whole.
            to_ort = _ort().OrtValue.ortvalue_from_numpy
            session.past = [to_ort(np.ascontiguousarray(v.numpy()[:, :, :done])) for v in past]
            session.length = session.cached_tokens = done
        return session, session.prefill(embeds[done:], should_stop)

    def _longest_kept(self, keys):
        """Return (prefix length, past) of the kept sequence sharing most of ``keys``."""
        # At least the last prompt position is run again: its logits are needed.
        lengths = [min(common_prefix(kept, keys), len(keys) - 1) for kept, _ in self._kept]
        if not lengths or max(lengths) <= 0:
            return 0, None
        best = int(np.argmax(lengths))
        entry = self._kept.pop(best)
        self._kept.append(entry)  # most recently used last
        return lengths[best], entry[1]

    def keep(self, session, token_ids):
        """Keep the KV cache of ``session`` (prompt and the answer fed so far) for later."""
        if not self.kv_cache_slots or session.rows != 1:
            return
        fed = session.length - len(session.prompt_keys)
        keys = np.concatenate([session.prompt_keys,
                               np.asarray(token_ids[:fed], dtype=np.int64)])
        # A prefix this one extends is no longer needed.
        self._kept = [(k, p) for k, p in self._kept if common_prefix(k, keys) < len(k)]
        self._kept.append((keys, session.past))
        del self._kept[:-self.kv_cache_slots]

    def clear_kept(self):
        """Forget every kept prefix."""
        self._kept = []


class OnnxDecoderSession(DecoderSession):
    """The KV cache of one request, kept as OrtValues between steps."""

    def __init__(self, decoder: OnnxDecoder):
        self.d = decoder
        self.rows = 1
        self.length = 0
        self.cached_tokens = 0
        self.prompt_keys = np.zeros(0, dtype=np.int64)
        ort = _ort()
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        empty = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), dtype=decoder.kv_dtype)
        self.past = [self._ortvalue(empty) for _ in decoder.past_names]

    def _run(self, embeds):
        """Run the decoder on embeds [rows, seq, hidden]; return last-position logits."""
        d = self.d
        rows, seq = embeds.shape[:2]
        total = self.length + seq
        if total > d.context_length:
            raise PromptTooLongError(f'the answer reached the {d.context_length}-token context')
        feed = {'inputs_embeds': self._ortvalue(np.ascontiguousarray(embeds))}
        inputs = d.io.inputs
        feed['attention_mask'] = self._ortvalue(
            np.ones((rows, total), dtype=d.io.dtype('attention_mask')))
        if 'position_ids' in inputs:
            positions = np.arange(self.length, total, dtype=d.io.dtype('position_ids'))
            feed['position_ids'] = self._ortvalue(np.ascontiguousarray(
                np.broadcast_to(positions, (rows, seq))))
        for name in ('num_logits_to_keep', 'logits_to_keep'):
            if name in inputs:
                shape = [1] if inputs[name].shape else []
                feed[name] = self._ortvalue(np.ones(shape, dtype=d.io.dtype(name)))
        if 'use_cache_branch' in inputs:
            feed['use_cache_branch'] = self._ortvalue(np.array([self.length > 0]))
        feed.update(zip(d.past_names, self.past, strict=True))
        outputs = d.session.run_with_ort_values([d.logits_name] + d.present_names, feed)
        self.past = list(outputs[1:])
        self.length = total
        logits = outputs[0].numpy()
        return np.asarray(logits[:, -1, :], dtype=np.float32)

    def prefill(self, embeds, should_stop=None):
        """Run the prompt, PREFILL_CHUNK positions at a time; returns logits [1, vocab]."""
        for at in range(0, len(embeds), PREFILL_CHUNK):
            if at and should_stop is not None and should_stop():
                raise Cancelled('cancelled while prefilling the prompt')
            logits = self._run(embeds[None, at:at + PREFILL_CHUNK])
        return logits

    def step(self, token_ids):
        """Feed one token per row; returns logits [rows, vocab]."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        embeds = self.d.embed_tokens(ids).reshape(len(ids), 1, -1)
        return self._run(embeds)

    def select(self, rows):
        """Reorder or duplicate cache rows (beam search)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows == len(rows) and np.array_equal(rows, np.arange(len(rows))):
            return
        self.past = [self._ortvalue(np.ascontiguousarray(v.numpy()[rows])) for v in self.past]
        self.rows = len(rows)
