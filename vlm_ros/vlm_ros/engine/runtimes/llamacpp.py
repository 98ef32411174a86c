"""
llama.cpp (through llama-cpp-python's low-level API): a GGUF language model as the decoder.

``LlamaCppDecoder`` offers the interface of ``OnnxDecoder`` (``start`` / ``context_length`` /
``hidden_size``), so the pipeline can pair either with a vision encoder. A prompt with image
features goes in as one embeddings input, its text rows looked up in the GGUF's token table
(``gguf_file.TensorRows``), where the architecture allows; otherwise as alternate token and
embedding batches. Either way one sequence at consecutive positions, and only the last
position produces logits. Beam search uses extra sequences that share the prompt's KV cells
(``llama_memory_seq_cp``), so it costs no copy of the cache; it needs ``max_beams`` at
construction.

With ``max_concurrent`` > 1 several requests share the context, each in a bank of sequence
ids of its own, and their decode steps run together (``step_batcher``).
"""

import collections
import ctypes
import functools
import logging
import os
import threading
from typing import List, Optional, Sequence

import numpy as np

from vlm_ros.engine import gguf_file
from vlm_ros.engine.caches import common_prefix, prefix_keys
from vlm_ros.engine.errors import (BackendError, Cancelled, GenerationError,
                                   ModelFilesError, ModelMismatchError, PromptTooLongError,
                                   UnsupportedModelError)
from vlm_ros.engine.generation import DecoderSession
from vlm_ros.engine.runtimes.native import NativeResource
from vlm_ros.engine.runtimes.step_batcher import StepBatcher

_LOG = logging.getLogger('vlm_ros.llamacpp')

KV_TYPES = {'f32': 0, 'f16': 1, 'q8_0': 8, 'q4_0': 2, 'bf16': 30}
# Architectures whose first layer takes an embeddings batch exactly as it takes the looked-up
# rows of tokens (no scaling or adapters on one input kind only, unlike Gemma's), so a whole
# prompt can go in as embeddings: SmolVLM's and InternVL's language models.
EMBEDDING_INPUT_ARCHS = {'llama', 'qwen2', 'qwen3', 'qwen2vl'}
# Architectures whose rotary embedding takes several positions per token (M-RoPE: temporal,
# height, width and an unused fourth), as llama.cpp lays them out for an embeddings batch.
MROPE_ARCHS = {'qwen2vl': 4, 'qwen3vl': 4, 'qwen3vlmoe': 4}
# Architectures llama.cpp loads that are not text decoders (embedding models, projectors).
NOT_DECODERS = {'clip', 'bert', 'nomic-bert', 'nomic-bert-moe', 'neo-bert', 'jina-bert-v2',
                'jina-bert-v3', 'modern-bert', 'eurobert', 't5encoder', 'wavtokenizer-dec'}

_init_lock = threading.Lock()
_state = {'lib': None, 'callback': None}
# Recent llama.cpp warnings and errors, quoted in our exceptions (its own reason for a
# failed load is only ever logged).
_recent = collections.deque(maxlen=64)


# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last).
_WARN, _CONT = 3, 5
_last_level = [0]


def _on_log(level, text, _user_data):
    """Keep llama.cpp's messages off stderr: remember warnings/errors, debug-log the rest."""
    try:
        message = text.decode('utf-8', 'replace') if text else ''
        if level == _CONT:
            level = _last_level[0]
            if level >= _WARN and _recent:
                _recent[-1] += message.rstrip('\n')
        else:
            _last_level[0] = level
            if level >= _WARN:
                _recent.append(message.strip())
        if _LOG.isEnabledFor(logging.DEBUG) and message.strip():
            _LOG.debug('llama.cpp: %s', message.rstrip())
    except Exception:  # noqa: B902 -- a C callback must never raise
        pass


def lib():
    """Import llama_cpp once: backend initialised, logging routed away from stderr."""
    with _init_lock:
        if _state['lib'] is None:
            try:
                import llama_cpp  # deferred: importing the engine must not load every runtime
            except ImportError as exc:
                raise UnsupportedModelError(
                    f'GGUF models run on llama-cpp-python, which cannot be imported: {exc}'
                ) from exc
            # The callback object must outlive every call llama.cpp makes into it.
            _state['callback'] = llama_cpp.llama_log_callback(_on_log)
            llama_cpp.llama_log_set(_state['callback'], ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _state['lib'] = llama_cpp
        return _state['lib']


def log_callback():
    """Return the ctypes log callback installed in llama.cpp (for mtmd's log setter)."""
    lib()
    return _state['callback']


def log_mark() -> None:
    """Forget earlier warnings: ``recent_errors`` then reports only what follows."""
    _recent.clear()


def recent_errors() -> str:
    """Return the last few warnings and errors llama.cpp logged since ``log_mark``."""
    lines = [line for line in _recent if line]
    return '; '.join(lines[-4:])


class LlamaCppDecoder(NativeResource):
    """
    A GGUF language model in one llama.cpp context; one instance serves many requests.

    ``n_threads`` 0 uses every core (for both decode and batch threads); ``n_ctx`` 0 takes
    the model's training context. ``kv_type`` is the KV cache precision (``f16`` like
    llama.cpp's default, ``f32`` for exact parity checks, ``q8_0``); ``flash_attn`` None
    lets llama.cpp decide, except that an ``f32`` cache turns it off (CPU flash attention
    computes in float16). ``max_beams`` > 1 reserves sequences for beam search.

    ``max_concurrent`` requests may be under way at once (threads of their own, each between
    ``start`` and ``LlamaCppSession.close``); their steps are decoded together, their prompts
    prefilled in chunks of ``prefill_chunk`` positions between those steps. With the default
    of 1, ``start`` supersedes a session that was not closed.

    An M-RoPE language model (``MROPE_ARCHS``: Qwen2-VL's) takes the multi-axis positions
    the family computed for the prompt (``start(positions=...)``); its answer continues
    from the largest of them, as transformers' ``rope_deltas`` do.

    ``kv_cache_slots`` > 0 keeps the KV cells of that many recent sequences (prompt and
    answer, stored by ``keep``) in sequences of their own; ``start`` copies the longest
    prefix one of them shares with the new prompt (cells are shared, not copied: one
    ``llama_memory_seq_cp``) and prefills only the rest. A prefix's identity covers the image
    features that filled it (``caches.prefix_keys``), not only the token ids.
    """

    def __init__(self, gguf_path, n_threads: int = 0, n_ctx: int = 0,
                 expected_hidden_size: Optional[int] = None, *, max_beams: int = 1,
                 kv_type: str = 'f16', flash_attn: Optional[bool] = None,
                 n_batch: int = 512, prompt_as_embeddings: bool = True,
                 kv_cache_slots: int = 0, n_gpu_layers: int = 0, max_concurrent: int = 1,
                 prefill_chunk: int = 128):
        self._ll = L = lib()
        self.path = os.fspath(gguf_path)
        self._model = self._ctx = None
        self._batches = []
        meta = gguf_file.read_metadata(self.path)
        self.architecture = str(meta.get('general.architecture', ''))
        self._check_architecture(meta)
        self.n_pos = MROPE_ARCHS.get(self.architecture, 1)
        """Positions per token: 1, or 4 for M-RoPE."""
        if kv_type not in KV_TYPES:
            raise GenerationError(f'unknown kv_type {kv_type!r} (known: {sorted(KV_TYPES)})')
        if max_beams < 1:
            raise GenerationError(f'max_beams must be at least 1, got {max_beams}')
        if max_concurrent < 1:
            raise GenerationError(f'max_concurrent must be at least 1, got {max_concurrent}')
        self.max_concurrent = int(max_concurrent)
        self._chunk = max(1, int(prefill_chunk)) if max_concurrent > 1 else None

        log_mark()
        params = L.llama_model_default_params()
        # Layers offloaded to a GPU (CUDA, Metal, ... builds of llama-cpp-python); -1: all.
        params.n_gpu_layers = int(n_gpu_layers) if n_gpu_layers >= 0 else 2 ** 31 - 1
        self.n_gpu_layers = n_gpu_layers
        self._model = L.llama_model_load_from_file(self.path.encode(), params)
        if not self._model:
            reason = recent_errors() or 'no reason given'
            error = (UnsupportedModelError if 'architecture' in reason else ModelFilesError)
            raise error(f'llama.cpp cannot load {self.path}: {reason}')
        try:
            self._setup(n_threads, n_ctx, expected_hidden_size, max_beams, kv_type,
                        flash_attn, n_batch, max(0, int(kv_cache_slots)))
            self._token_rows = (self._open_token_rows() if prompt_as_embeddings else None)
        except BaseException:
            self.close()
            raise

    def _check_architecture(self, meta):
        arch = self.architecture
        name = os.path.basename(self.path)
        if arch == 'clip' or meta.get('general.type') == 'mmproj':
            raise UnsupportedModelError(
                f'{name} is a multimodal projector (mmproj, architecture {arch!r}), not a '
                'language model: give it as the projector and the language model GGUF as '
                'the decoder')
        if not arch:
            raise ModelFilesError(f'{name} has no general.architecture: not a model GGUF')
        if arch in NOT_DECODERS:
            raise UnsupportedModelError(
                f'{name} has architecture {arch!r}, which is not a text decoder (an '
                'embedding or encoder model)')

    def _open_token_rows(self):
        """Map the token embedding table, when llama.cpp takes the prompt as embeddings."""
        if self.architecture not in EMBEDDING_INPUT_ARCHS:
            return None
        rows = gguf_file.TensorRows.from_file(self.path, 'token_embd.weight')
        if rows is None or (rows.width, rows.count) != (self.hidden_size, self.vocab_size):
            return None
        return rows

    def _setup(self, n_threads, n_ctx, expected_hidden_size, max_beams, kv_type, flash_attn,
               n_batch, kv_cache_slots):
        L = self._ll
        name = os.path.basename(self.path)
        model = self._model
        if not L.llama_model_has_decoder(model) or L.llama_model_has_encoder(model):
            raise UnsupportedModelError(f'{name}: encoder or encoder-decoder models are not '
                                        'supported; a decoder-only language model is needed')
        if L.llama_model_is_diffusion(model):
            raise UnsupportedModelError(f'{name} is a diffusion language model: not supported')
        self.hidden_size = int(L.llama_model_n_embd_inp(model))
        if expected_hidden_size and expected_hidden_size != self.hidden_size:
            raise ModelMismatchError(
                f'{name} takes embeddings of width {self.hidden_size}, but the model config '
                f'and vision encoder use {expected_hidden_size} (files from different models?)')
        self.n_ctx_train = int(L.llama_model_n_ctx_train(model))
        self.n_threads = n_threads if n_threads > 0 else (os.cpu_count() or 1)
        # Beam search needs sequences sharing cells: a single request's decoder only.
        self.max_beams = max_beams if self.max_concurrent == 1 else 1
        self._vocab = L.llama_model_get_vocab(model)
        self.vocab_size = int(L.llama_vocab_n_tokens(self._vocab))

        params = L.llama_context_default_params()
        requested = int(n_ctx) if n_ctx and n_ctx > 0 else self.n_ctx_train
        params.n_ctx = requested
        params.n_batch = params.n_ubatch = max(1, min(n_batch, requested))
        if self.max_concurrent == 1:
            # Beams live in a second set of sequence ids; a unified KV cache lets sequences
            # share cells, so copying a sequence is bookkeeping, not a copy of the cache.
            # Then the kept prefixes, one sequence each.
            bank = 1 if max_beams == 1 else 2 * max_beams
            self._banks = [list(range(bank))]
            self._prefixes = _Prefixes(list(range(bank, bank + kv_cache_slots)))
            params.n_seq_max = bank + kv_cache_slots
            params.kv_unified = True
        else:
            # Concurrent requests: one sequence each, each in a KV stream of its own with
            # its own n_ctx. In a unified cache a sequence's cells scatter among the others'
            # and attention sums them in another order: answers would depend on who else is
            # running (seen as flipped tokens after ~100 steps of 8 sequences). Streams keep
            # every answer what it is alone. A stream keeps its last request's cells, reused
            # by a next one that shares a prefix with it (instead of ``_Prefixes``).
            if self.max_concurrent > int(L.llama_max_parallel_sequences()):
                raise GenerationError(f'max_concurrent={self.max_concurrent} exceeds the '
                                      'limit of sequences in one llama.cpp context')
            self._banks = [[i] for i in range(self.max_concurrent)]
            self._prefixes = _Prefixes([])
            self._stream_keys = [None] * self.max_concurrent
            self._stream_used = [0] * self.max_concurrent
            self._keep_streams = kv_cache_slots > 0
            params.n_seq_max = self.max_concurrent
            params.n_ctx = requested * self.max_concurrent
            params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = KV_TYPES[kv_type]
        if flash_attn is None and kv_type == 'f32':
            # CPU flash attention rounds K, V and Q to float16, which would defeat the
            # point of a float32 cache (exact comparisons with the reference).
            flash_attn = False
        if flash_attn is None and self.max_concurrent > 1:
            # With flash attention, an answer decoded beside others differed from the same
            # answer alone (f16 cache, tiny model, after ~80 tokens); without, it does not.
            # It was also slower for several rows here: SmolVLM2-256M Q8_0, 2 cores, ~130
            # cached positions, 4 rows 44-48 ms with it vs 34-37 without, 8 rows 71 vs 53-60.
            flash_attn = False
        if flash_attn is not None:
            params.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        log_mark()
        self._ctx = L.llama_init_from_model(model, params)
        if not self._ctx:
            raise BackendError(f'llama.cpp cannot create a {requested}-token context for '
                               f'{name}: {recent_errors() or "no reason given"}')
        self.context_length = min(requested, int(L.llama_n_ctx_seq(self._ctx)))
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._memory = L.llama_get_memory(self._ctx)
        self._tokens = _Batch(L, self.n_batch, 0)  # text: one position per token, always
        self._batches.append(self._tokens)
        self._embeds: Optional[_Batch] = None
        self._eog: Optional[List[int]] = None
        # Every call on the context (decode, memory, logits) holds this lock; the batcher
        # decides whose work runs, the lock keeps sessions' bookkeeping out of its way.
        self._lock = threading.RLock()
        self._sessions = [None] * self.max_concurrent  # per bank: the session using it
        self._batcher = (StepBatcher(self._run_steps) if self.max_concurrent > 1 else None)
        # Step batches run so far, by the number of sessions they carried (diagnostics).
        self.batch_sizes = collections.Counter()

    # -- requests -----------------------------------------------------------------------

    def start(self, input_ids, image_features=None, image_token_id=None, should_stop=None,
              positions=None):
        """
        Prefill the prompt; returns (session, logits [1, vocab] of the last position).

        The positions of ``image_token_id`` in ``input_ids`` take ``image_features``
        [tokens, hidden] in order. ``positions`` (int [3, seq]: temporal, height, width) are
        the prompt's M-RoPE positions, needed with image features on an M-RoPE model and
        refused by others. ``should_stop`` is polled between prefill chunks (of ``n_batch``
        positions, ``prefill_chunk`` when concurrent); when it returns True, ``Cancelled``
        is raised. The caller closes the session when done with it.
        """
        ids, slots, features, text = self._check_prompt(input_ids, image_features,
                                                        image_token_id)
        pos = self._check_positions(positions, ids, features is not None)
        session = self._open(prefix_keys(ids, features, image_token_id), pos)
        # Answer tokens continue from the largest prompt position (Qwen2-VL's rope_deltas).
        session.pos_shift = 0 if pos is None else int(pos.max()) + 1 - int(ids.size)
        try:
            logits = self._fill(session, ids, slots, features, text, should_stop, pos)
        except BaseException:
            session.close()
            raise
        if self._batcher is not None:
            self._batcher.joined(session)
        return session, logits

    def _check_prompt(self, input_ids, image_features, image_token_id):
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise GenerationError('the prompt is empty')
        if ids.size + 1 > self.context_length:
            raise PromptTooLongError(
                f'prompt of {ids.size} tokens leaves no room in the {self.context_length}-token '
                'context; shorten the prompt or disable image splitting')
        slots = np.zeros(ids.size, dtype=bool)
        features = None
        if image_features is not None and len(image_features):
            features = np.asarray(image_features, dtype=np.float32)
            features = features.reshape(-1, features.shape[-1])
            if features.shape[1] != self.hidden_size:
                raise ModelMismatchError(
                    f'image features have width {features.shape[1]}, but '
                    f'{os.path.basename(self.path)} takes embeddings of width '
                    f'{self.hidden_size} (vision encoder from another model?)')
            slots = ids == image_token_id
            if int(slots.sum()) != len(features):
                raise ModelMismatchError(
                    f'the prompt has {int(slots.sum())} image tokens but the vision encoder '
                    f'produced {len(features)} features: image_seq_len in the processor config '
                    'does not match the vision encoder')
        text = ids[~slots]
        bad = text[(text < 0) | (text >= self.vocab_size)]
        if bad.size:
            raise ModelMismatchError(f'token id {int(bad[0])} is outside the vocabulary of '
                                     f'{self.vocab_size} tokens of {os.path.basename(self.path)}')
        return ids, slots, features, text

    def _check_positions(self, positions, ids, with_images):
        """Return the prompt's positions as int32 [n_pos, seq] (M-RoPE), or None."""
        name = os.path.basename(self.path)
        if positions is None:
            if self.n_pos > 1 and with_images:
                raise GenerationError(
                    f'{name} ({self.architecture}) places image features by multi-axis '
                    '(M-RoPE) positions, and none were given with this prompt')
            return None
        if self.n_pos == 1:
            raise ModelMismatchError(
                f'the prompt comes with multi-axis (M-RoPE) positions, but {name} '
                f'({self.architecture}) takes one position per token (files from different '
                'models?)')
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 2 or pos.shape[1] != ids.size or not 1 <= pos.shape[0] <= self.n_pos:
            raise GenerationError(f'positions must be [3, {ids.size}] (temporal, height, '
                                  f'width) for this prompt, got {list(pos.shape)}')
        if pos.min() < 0 or pos.max() + 1 >= self.context_length:
            raise PromptTooLongError(f'prompt positions reach {int(pos.max())}, beyond the '
                                     f'{self.context_length}-token context')
        out = np.zeros((self.n_pos, ids.size), dtype=np.int32)
        out[:len(pos)] = pos
        return out

    @staticmethod
    def _cut(pos, n):
        """
        Return ``(tokens, position)``: a reusable prefix of ``n`` prompt tokens, and more.

        ``position`` is where the rest of the prompt starts (the KV cache keeps cells by
        position). With M-RoPE an image's tokens share one temporal position, which cannot
        be split: a prefix ending inside an image stops before it.
        """
        if pos is None or n <= 0:
            return n, n
        start = int(pos[0, n])
        while n > 0 and int(pos[0, n - 1]) == start:
            n -= 1
        return n, start

    def _open(self, keys, pos=None):
        """Give a new session a bank of sequence ids (one request alone: supersede it)."""
        with self._lock:
            free = [i for i, s in enumerate(self._sessions) if s is None]
            if not free and self.max_concurrent == 1:
                self._sessions[0].close()
                free = [0]
            if not free:
                raise GenerationError(f'more than max_concurrent={self.max_concurrent} '
                                      'requests at once on one llama.cpp decoder')
            index, reused = free[0], 0
            if self.max_concurrent > 1:
                index, reused = self._pick_stream(free, keys)
            reused, start = self._cut(pos, reused)
            session = LlamaCppSession(self, index)
            session.reused = reused
            self._sessions[index] = session
            for seq in session.bank:  # what a request before left (beyond a reused prefix)
                self._ll.llama_memory_seq_rm(self._memory, seq, start, -1)
        session.prompt_keys = keys
        return session

    def _pick_stream(self, free, keys):
        """Return (free stream, prefix length to reuse): the longest kept prefix, else LRU."""
        best, index = 0, None
        for i in free:
            kept = self._stream_keys[i]
            if kept is not None:
                # At least the last prompt position is decoded again: its logits are needed.
                n = min(common_prefix(kept, keys), len(keys) - 1)
                if n > best:
                    best, index = n, i
        if index is None:
            index = min(free, key=lambda i: (self._stream_keys[i] is not None,
                                             self._stream_used[i]))
        self._stream_keys[index] = None
        self._stream_used[index] = max(self._stream_used) + 1
        return index, best

    def _close(self, session):
        with self._lock:
            index = session.bank_index
            if self._sessions[index] is not session:
                return
            if self.max_concurrent == 1 or self._stream_keys[index] is None:
                for seq in session.bank:
                    self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
            self._sessions[index] = None
        if self._batcher is not None:
            self._batcher.left(session)

    def _fill(self, session, ids, slots, features, text, should_stop, pos):
        """Prefill ``session``'s sequence after the longest kept prefix; return last logits."""
        seq = session.seqs[0]
        with self._lock:
            if self.max_concurrent > 1:
                done = session.reused
            else:
                done, kept = self._prefixes.best(session.prompt_keys)
                done, start = self._cut(pos, done)
                if done:
                    self._ll.llama_memory_seq_cp(self._memory, kept, seq, 0, start)
        try:
            logits = self._run_chunks(self._chunks(seq, ids, slots, features, text, done, pos),
                                      should_stop)
        except PromptTooLongError:
            with self._lock:
                if not self._prefixes.seqs_in_use():
                    raise
                # The kept prefixes hold cells the prompt needs: drop them, prefill it all.
                self._drop_prefixes()
                self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
            done = 0
            logits = self._run_chunks(self._chunks(seq, ids, slots, features, text, done, pos),
                                      should_stop)
        session.cached_tokens = done
        session.length = int(ids.size)
        return logits

    def _run_chunks(self, chunks, should_stop):
        """Run prefill chunks in order (between other sessions' steps when concurrent)."""
        logits = None
        for i, chunk in enumerate(chunks):
            if i and should_stop is not None and should_stop():
                raise Cancelled('cancelled while prefilling the prompt')
            logits = chunk() if self._batcher is None else self._batcher.chunk(chunk)
        return logits

    def _chunks(self, seq, ids, slots, features, text, done, pos):
        """
        Yield the prefill of prompt rows ``done`` onwards as callables, one decode each.

        ``pos``: int32 [n_pos, seq] positions (M-RoPE), or None for consecutive ones.
        """
        if pos is None:
            pos = np.arange(ids.size, dtype=np.int32)[None]
        if features is not None and self._token_rows is not None:
            # The whole prompt as one embeddings input, text rows dequantized from the GGUF
            # as llama.cpp's own lookup does: it goes through in n_batch chunks like a text
            # prompt, not one llama_decode per run of text or of image tokens (about 35 runs
            # with image splitting). SmolVLM2-256M Q8_0 on 2 cores: 1181 tokens 2208 -> 1585
            # ms, 93 tokens 123 -> 98 ms.
            embeds = np.empty((ids.size, self.hidden_size), dtype=np.float32)
            embeds[slots] = features
            embeds[~slots] = self._token_rows(text)
            yield from self._row_chunks(self._embeddings_batch(), embeds[done:], pos[:, done:],
                                        True, seq)
            return
        # Alternate runs of text tokens and image embeddings, in prompt order.
        edges = np.flatnonzero(np.diff(slots.astype(np.int8))) + 1
        bounds = [0, *[e for e in edges.tolist() if e > done], ids.size]
        bounds[0] = done
        used = int(slots[:done].sum())
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            last = end == ids.size
            if slots[begin]:
                yield from self._row_chunks(self._embeddings_batch(),
                                            features[used:used + end - begin],
                                            pos[:, begin:end], last, seq)
                used += end - begin
            else:
                # Text positions are equal on every M-RoPE axis: llama.cpp spreads one.
                yield from self._row_chunks(self._tokens, ids[begin:end], pos[:1, begin:end],
                                            last, seq)

    def keep(self, session, token_ids):
        """
        Keep the KV cells of ``session`` (prompt and the answer fed so far) for later prompts.

        A request that continued a kept prefix replaces it; otherwise the least recently
        used prefix makes room. Beam searches are not kept (their sequences moved).
        """
        if session.closed or session.seqs != session.bank[:1]:
            return
        fed = session.length - len(session.prompt_keys)
        keys = np.concatenate([session.prompt_keys,
                               np.asarray(token_ids[:fed], dtype=np.int64)])
        if self.max_concurrent > 1:
            if self._keep_streams:  # the stream keeps its cells when the session closes
                self._stream_keys[session.bank_index] = keys
            return
        if not self._prefixes.seqs:
            return
        L = self._ll
        with self._lock:
            seq = self._prefixes.slot_for(keys)
            L.llama_memory_seq_rm(self._memory, seq, -1, -1)
            L.llama_memory_seq_cp(self._memory, session.seqs[0], seq, -1, -1)
            self._prefixes.store(seq, keys)

    def clear_kept(self):
        """Forget every kept prefix (frees their KV cells)."""
        with self._lock:
            self._drop_prefixes()
            if self.max_concurrent > 1:
                for i, session in enumerate(self._sessions):
                    if session is None and self._stream_keys[i] is not None:
                        self._ll.llama_memory_seq_rm(self._memory, i, -1, -1)
                        self._stream_keys[i] = None

    def _drop_prefixes(self):
        for seq in self._prefixes.seqs_in_use():
            self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._prefixes.clear()

    def _embeddings_batch(self):
        with self._lock:
            if self._embeds is None:
                self._embeds = _Batch(self._ll, self.n_batch, self.hidden_size, self.n_pos)
                self._batches.append(self._embeds)
            return self._embeds

    def _row_chunks(self, batch, rows, pos, want_last, seq):
        """
        Yield the decode of ``rows`` of sequence ``seq`` at positions ``pos`` in chunks.

        ``rows`` are token ids for the token batch, embeddings [n, hidden] for the embeddings
        batch; ``pos`` int32 [axes, n] their positions (one axis, or the batch's n_pos).
        Only the last row's logits are kept, and only when ``want_last``.
        """
        if batch is not self._tokens:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
        size = self.n_batch if self._chunk is None else min(self.n_batch, self._chunk)
        for at in range(0, len(rows), size):
            chunk = rows[at:at + size]
            last = want_last and at + len(chunk) == len(rows)
            yield functools.partial(self._decode_rows, batch, chunk, pos[:, at:at + size],
                                    last, seq)

    def _decode_rows(self, batch, chunk, pos, last, seq):
        n = len(chunk)
        with self._lock:
            batch.input[:n] = chunk
            batch.set_positions(pos)
            batch.set_seqs(n, [seq] * n)
            batch.logits[:n] = 0
            if last:
                batch.logits[n - 1] = 1
            self._decode(batch, n, answering=False)
            return self._logits(1) if last else None

    def _decode(self, batch, n, answering):
        batch.struct.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, batch.struct)
        if rc == 1 and answering and self._prefixes.seqs_in_use():
            # No free cells while answering: the kept prefixes give theirs back.
            self._drop_prefixes()
            rc = self._ll.llama_decode(self._ctx, batch.struct)
        if rc != 0:
            reason = recent_errors() or f'llama_decode returned {rc}'
            if rc == 1:
                raise PromptTooLongError(f'the llama.cpp KV cache is full: {reason}')
            raise BackendError(f'llama.cpp failed to decode: {reason}')

    def _logits(self, rows):
        """Copy the logits of the batch's ``rows`` output positions (one copy per row)."""
        L = self._ll
        out = np.empty((rows, self.vocab_size), dtype=np.float32)
        for i in range(rows):
            ptr = L.llama_get_logits_ith(self._ctx, i - rows)
            if not ptr:
                raise BackendError('llama.cpp returned no logits')
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))
        return out

    def _step(self, session, token_ids):
        if session.closed:
            raise GenerationError('this llama.cpp session was closed or superseded by a newer '
                                  'request on the same decoder')
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(session.seqs):
            raise GenerationError(f'step got {len(ids)} tokens for {len(session.seqs)} '
                                  'sequences')
        if session.length + 1 > self.context_length:
            raise PromptTooLongError(f'the answer reached the {self.context_length}-token '
                                     'context')
        if self._batcher is not None:
            return self._batcher.step(session, ids)
        with self._lock:
            rows = self._put_steps([(session, ids)])
            self._decode(self._tokens, rows, answering=True)
            session.length += 1
            return self._logits(rows)

    def _put_steps(self, steps):
        """Fill the token batch with one step of each (session, tokens); return its rows."""
        batch, rows = self._tokens, 0
        for session, tokens in steps:
            n = len(tokens)
            batch.input[rows:rows + n] = tokens
            batch.pos[rows:rows + n] = session.length + session.pos_shift
            rows += n
        batch.set_seqs(rows, [seq for session, _ in steps for seq in session.seqs])
        batch.logits[:rows] = 1
        return rows

    def _run_steps(self, jobs):
        """Decode one step of several sessions in one llama_decode (the batcher's runner)."""
        with self._lock:
            # Rows in sequence order: with a KV stream per sequence, 8 rows in arrival order
            # took 112 ms here and the same rows in sequence order 60 (llama.cpp splits a
            # batch over streams into micro-batches, each reading the weights again).
            jobs = sorted((job for job in jobs if not self._failed_closed(job)),
                          key=lambda job: job.session.seqs[0])
            while jobs:
                rows = self._put_steps([(job.session, job.tokens) for job in jobs])
                try:
                    self._decode(self._tokens, rows, answering=True)
                except PromptTooLongError as exc:
                    # No cell left for all of them: the batch's last answer gives up, the
                    # others try again (llama.cpp placed none of the batch's cells).
                    jobs.pop().fail(exc)
                    continue
                logits = self._logits(rows)
                self.batch_sizes[len(jobs)] += 1
                at = 0
                for job in jobs:
                    n = len(job.tokens)
                    job.session.length += 1
                    job.succeed(logits[at:at + n])
                    at += n
                return

    @staticmethod
    def _failed_closed(job):
        if job.session.closed:
            job.fail(GenerationError('this llama.cpp session was closed'))
            return True
        return False

    def _select(self, session, rows):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        seqs = session.seqs
        if len(rows) == len(seqs) and np.array_equal(rows, np.arange(len(rows))):
            return
        if session.closed:
            raise GenerationError('this llama.cpp session was superseded by a newer request')
        if len(rows) > self.max_beams:
            if self.max_concurrent > 1:
                raise GenerationError('beam search needs a llama.cpp decoder that answers one '
                                      'request at a time (max_concurrent 1)')
            if self.max_beams == 1:
                raise GenerationError('beam search is not supported on llama.cpp unless the '
                                      'decoder is created with max_beams >= num_beams')
            raise GenerationError(f'{len(rows)} beams requested but the llama.cpp decoder '
                                  f'was created with max_beams={self.max_beams}')
        L = self._ll
        bank = session.bank
        half = bank[self.max_beams:] if seqs[0] in bank[:self.max_beams] else bank
        new = half[:len(rows)]
        with self._lock:
            for dst, src in zip(new, rows, strict=True):
                L.llama_memory_seq_cp(self._memory, seqs[int(src)], dst, -1, -1)
            for seq in seqs:
                L.llama_memory_seq_rm(self._memory, seq, -1, -1)
        session.seqs = list(new)

    # -- vocabulary -----------------------------------------------------------------------

    def eog_token_ids(self) -> List[int]:
        """Token ids llama.cpp treats as end of generation (EOS, EOT, <|im_end|>, ...)."""
        if self._eog is None:
            L, vocab = self._ll, self._vocab
            self._eog = [i for i in range(self.vocab_size) if L.llama_vocab_is_eog(vocab, i)]
        return list(self._eog)

    def tokenize(self, text: str, add_special: bool = False,
                 parse_special: bool = True) -> List[int]:
        """Token ids of ``text`` with the GGUF's own tokenizer."""
        L = self._ll
        data = text.encode('utf-8')
        size = len(data) + 8
        while True:
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, size, add_special,
                                 parse_special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def detokenize(self, token_ids: Sequence[int], unparse_special: bool = True) -> str:
        """Text of ``token_ids`` with the GGUF's own tokenizer."""
        L = self._ll
        ids = [int(i) for i in token_ids]
        tokens = (L.llama_token * max(1, len(ids)))(*ids)
        size = 16 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_detokenize(self._vocab, tokens, len(ids), buf, size, False,
                                   unparse_special)
            if n >= 0:
                return buf.raw[:n].decode('utf-8', 'replace')
            size = -n

    def metadata(self, key: str) -> Optional[str]:
        """Return a GGUF metadata value as text (e.g. ``general.name``), or None."""
        L = self._ll
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode('utf-8', 'replace') if n >= 0 else None

    def close(self):
        """Free the context, batches and model (also done when garbage collected)."""
        L = self._ll
        if getattr(self, '_batcher', None) is not None:
            self._batcher.close()
        for batch in self._batches:
            batch.free()
        self._batches = []
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None


class _Batch:
    """
    A llama_batch with numpy views of its arrays, allocated once and reused.

    ``n_pos`` > 1 (an M-RoPE model's embeddings batch): llama.cpp reads ``n_pos`` positions
    per entry, axis by axis ([axis][entry] for the batch's n_tokens), more than
    ``llama_batch_init`` allocates; the batch then points at a larger array of its own.
    """

    def __init__(self, L, capacity, n_embd, n_pos=1):
        self._ll = L
        self.struct = L.llama_batch_init(capacity, n_embd, 1)
        s = self.struct
        self.capacity = capacity
        self._own_pos = self._allocated_pos = None
        if n_pos > 1:
            # The address, not the pointer object: that one shares the struct's field.
            self._allocated_pos = ctypes.cast(s.pos, ctypes.c_void_p).value
            self._own_pos = np.zeros(n_pos * capacity, dtype=np.int32)
            s.pos = self._own_pos.ctypes.data_as(type(s.pos))
        # What the batch carries: embeddings [capacity, n_embd] or token ids [capacity].
        if n_embd:
            self.input = np.ctypeslib.as_array(s.embd, shape=(capacity, n_embd))
        else:
            self.input = np.ctypeslib.as_array(s.token, shape=(capacity,))
        self.pos = (self._own_pos if self._own_pos is not None
                    else np.ctypeslib.as_array(s.pos, shape=(capacity,)))
        self.logits = np.ctypeslib.as_array(s.logits, shape=(capacity,))
        n_seq = np.ctypeslib.as_array(s.n_seq_id, shape=(capacity,))
        n_seq[:] = 1
        self._seq = [s.seq_id[i] for i in range(capacity)]
        for ptr in self._seq:
            ptr[0] = 0
        self._current = np.zeros(capacity, dtype=np.int64)  # what each entry holds now

    def set_seqs(self, n, seqs):
        """Sequence ids of the first ``n`` entries."""
        want = np.asarray(seqs, dtype=np.int64)
        for i in np.flatnonzero(self._current[:n] != want).tolist():
            self._seq[i][0] = int(want[i])
        self._current[:n] = want

    def set_positions(self, pos):
        """Positions of the first ``n`` entries: ``pos`` [axes, n], axis-major."""
        n = pos.shape[1]
        self.pos[:pos.shape[0] * n] = pos.reshape(-1)

    def free(self):
        if self.struct is not None:
            if self._allocated_pos is not None:  # llama_batch_free frees its own array
                self.struct.pos = ctypes.cast(self._allocated_pos, type(self.struct.pos))
            self._ll.llama_batch_free(self.struct)
            self.struct = None


class LlamaCppSession(DecoderSession):
    """One request's sequences in the decoder's llama.cpp context."""

    def __init__(self, decoder: LlamaCppDecoder, bank_index: int):
        self.d = decoder
        self.bank_index = bank_index
        self.bank = decoder._banks[bank_index]
        self.length = 0
        self.pos_shift = 0
        """Position of the next token minus ``length`` (M-RoPE prompts with images)."""
        self.seqs = self.bank[:1]
        self.prompt_keys = np.zeros(0, dtype=np.int64)
        self.cached_tokens = 0
        self.closed = False
        self.reused = 0

    @property
    def rows(self):
        """Count the live sequences (beams)."""
        return len(self.seqs)

    def step(self, token_ids):
        """Feed one token per row; returns logits [rows, vocab]."""
        return self.d._step(self, token_ids)

    def select(self, rows):
        """Make row i a copy of old row ``rows[i]`` (KV cells shared, not copied)."""
        self.d._select(self, rows)

    def close(self):
        """Free the session's sequences (its KV cells) for other requests."""
        if not self.closed:
            self.closed = True
            self.d._close(self)


class _Prefixes:
    """Which kept prefix lives in which sequence id, and which was used last."""

    def __init__(self, seqs):
        self.seqs = seqs
        self._keys = {}
        self._used = {}
        self._clock = 0

    def best(self, keys):
        """Return (prefix length, sequence) of the longest kept prefix of ``keys``."""
        best, best_seq = 0, None
        for seq, kept in self._keys.items():
            # At least the last prompt position is decoded again: its logits are needed.
            n = min(common_prefix(kept, keys), len(keys) - 1)
            if n > best:
                best, best_seq = n, seq
        if best_seq is not None:
            self._touch(best_seq)
        return best, best_seq

    def slot_for(self, keys):
        """Return the sequence to store ``keys`` in: one it extends, a free one, or the LRU."""
        for seq, kept in self._keys.items():
            if common_prefix(kept, keys) == len(kept):
                return seq
        free = [s for s in self.seqs if s not in self._keys]
        if free:
            return free[0]
        return min(self._keys, key=self._used.get)

    def store(self, seq, keys):
        self._keys[seq] = keys
        self._touch(seq)

    def seqs_in_use(self):
        return list(self._keys)

    def clear(self):
        self._keys.clear()
        self._used.clear()

    def _touch(self, seq):
        self._clock += 1
        self._used[seq] = self._clock
