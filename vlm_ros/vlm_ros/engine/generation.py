"""
Token selection on top of any decoder: greedy, sampling, beam search, stop rules, streaming.

Runtimes hand over logits as float32 numpy arrays through a small session object, so the
same code drives ONNX Runtime and llama.cpp. The logits processing follows transformers'
semantics (repetition penalty, then temperature, top-k, top-p; beam scoring with its length
penalty and early-stop heuristic) so that results can be checked token for token against the
reference implementation.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from vlm_ros.engine.datatypes import (FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP,
                                      GenerationConfig)

NEG_INF = np.float32(-np.inf)
BEAM_MASK = np.float32(-1.0e9)  # the large negative transformers adds to retire beams


class DecoderSession:
    """
    One request's decoder state, as the runtimes implement it.

    ``step`` feeds one token per sequence and returns the next logits; ``select`` keeps,
    reorders or duplicates sequences (rows) for beam search.
    """

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Feed ``token_ids`` int64 [rows]; return float32 logits [rows, vocab]."""
        raise NotImplementedError

    def select(self, rows: np.ndarray) -> None:
        """Make row i of the state a copy of old row ``rows[i]``."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the request's decoder state back (a runtime that keeps none does nothing)."""


@dataclass
class Generated:
    """What the generation loop produced."""

    token_ids: List[int]
    text: str
    finish_reason: str


class TextStream:
    """
    Turns a growing token list into text deltas, honouring stop strings.

    Re-decoding the whole answer each step keeps multi-token characters and tokenizer
    merges right; the cost is negligible at these answer lengths. Text that could still be
    the start of a stop string, or an incomplete UTF-8 sequence, is held back.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (),
                 on_text: Optional[Callable[[str], None]] = None):
        self._decode = decode
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._on_text = on_text
        self._emitted = 0
        self.text = ''

    def update(self, token_ids) -> bool:
        """Decode ``token_ids``; return True when a stop string has appeared."""
        text = self._decode(token_ids)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self._emit(len(self.text))
            return True
        self.text = text
        safe = len(text) - self._hold
        while safe > self._emitted and text[safe - 1] == '\ufffd':
            safe -= 1
        self._emit(safe)
        return False

    def finish(self, cut=False):
        """
        Flush what was held back and return the final text.

        ``cut``: the answer was interrupted (cancelled), so a character its last tokens only
        began (decoded as U+FFFD) is not part of it and is dropped.
        """
        if cut:
            self.text = self.text.rstrip('\ufffd')
            self._emitted = min(self._emitted, len(self.text))
        self._emit(len(self.text))
        return self.text

    def _emit(self, end):
        if end > self._emitted:
            if self._on_text is not None:
                self._on_text(self.text[self._emitted:end])
            self._emitted = end


def process_logits(scores, sequence, config, eos_ids, generated_len):
    """
    Apply repetition penalty, the min_new_tokens EOS ban and the sampling warpers in place.

    ``scores`` float32 [vocab] for one sequence; ``sequence`` is prompt plus generated ids.
    """
    if config.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(sequence, dtype=np.int64))
        seen = seen[seen < scores.shape[-1]]
        picked = scores[seen]
        scores[seen] = np.where(picked < 0, picked * config.repetition_penalty,
                                picked / config.repetition_penalty)
    if (generated_len < config.min_new_tokens or config.ignore_eos) and eos_ids:
        scores[[i for i in eos_ids if i < scores.shape[-1]]] = NEG_INF
    return scores


def warp(scores, config):
    """Temperature, top-k and top-p as transformers' warpers do them (in that order)."""
    scores = scores / np.float32(config.temperature)
    if 0 < config.top_k < scores.shape[-1]:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores = np.where(scores < kth, NEG_INF, scores)
    if config.top_p < 1.0:
        order = np.argsort(scores, kind='stable')  # ascending, as transformers sorts
        probs = softmax(scores[order])
        remove = np.cumsum(probs) <= (1.0 - config.top_p)
        remove[-1] = False  # keep at least one token
        scores = scores.copy()
        scores[order[remove]] = NEG_INF
    return scores


def softmax(x):
    """Numerically stable softmax over the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(x):
    """Numerically stable log-softmax over the last axis, in float32."""
    x = x.astype(np.float32, copy=False)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def generate(session: DecoderSession, first_logits: np.ndarray, prompt_ids: Sequence[int],
             config: GenerationConfig, eos_ids: Sequence[int],
             decode: Callable[[Sequence[int]], str], max_new_tokens: int,
             on_text: Optional[Callable[[str], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None,
             on_token: Optional[Callable[[int], None]] = None) -> Generated:
    """
    Generate up to ``max_new_tokens`` after a prefill whose last logits are ``first_logits``.

    ``max_new_tokens`` is the caller's budget (already limited by the context size); an
    answer that uses it all ends with ``length``. ``on_token`` gets the count of generated
    tokens after each one (beam search: once, at the end).
    """
    if config.num_beams > 1:
        out = _beam_search(session, first_logits, prompt_ids, config, eos_ids, decode,
                           max_new_tokens, on_text, should_stop)
        if on_token is not None:
            on_token(len(out.token_ids))
        return out
    eos = set(eos_ids)
    rng = np.random.default_rng(config.seed)
    stream = TextStream(decode, config.stop, on_text)
    sequence = list(prompt_ids)
    generated: List[int] = []
    logits = np.array(first_logits, dtype=np.float32).reshape(-1)
    finish = FINISH_LENGTH
    while True:
        if should_stop is not None and should_stop():
            finish = FINISH_CANCELLED
            break
        scores = process_logits(logits, sequence, config, eos_ids, len(generated))
        if config.do_sample:
            probs = softmax(warp(scores, config).astype(np.float64))
            token = int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(),
                                            side='right'), probs.size - 1))
        else:
            token = int(np.argmax(scores))
        generated.append(token)
        sequence.append(token)
        if on_token is not None:
            on_token(len(generated))
        if token in eos and not config.ignore_eos:
            finish = FINISH_STOP
            break
        if stream.update(generated):
            finish = FINISH_STOP
            break
        if len(generated) >= max_new_tokens:
            break
        logits = np.asarray(session.step(np.array([token], dtype=np.int64)),
                            dtype=np.float32).reshape(-1)
    return Generated(generated, stream.finish(cut=finish == FINISH_CANCELLED), finish)


def _beam_search(session, first_logits, prompt_ids, config, eos_ids, decode, max_new_tokens,
                 on_text, should_stop):
    """Beam search for one prompt, scored and stopped exactly as transformers does it."""
    beams = config.num_beams
    eos = set(eos_ids) if not config.ignore_eos else set()
    keep = max(2, 1 + len(eos)) * beams
    vocab = first_logits.shape[-1]
    prompt = list(prompt_ids)
    running: List[List[int]] = [[] for _ in range(beams)]
    running_scores = np.full(beams, BEAM_MASK, dtype=np.float32)
    running_scores[0] = 0.0
    finished: List[List[int]] = [[] for _ in range(beams)]
    finished_scores = np.full(beams, BEAM_MASK, dtype=np.float32)
    finished_flags = np.zeros(beams, dtype=bool)
    can_improve = True
    session.select(np.zeros(beams, dtype=np.int64))
    logits = np.repeat(np.asarray(first_logits, dtype=np.float32).reshape(1, vocab), beams, 0)
    finish = FINISH_LENGTH
    step = 0
    while True:
        if should_stop is not None and should_stop():
            finish = FINISH_CANCELLED
            break
        logp = log_softmax(logits)
        for row in range(beams):
            process_logits(logp[row], prompt + running[row], config, eos_ids, step)
        total = (logp + running_scores[:, None]).reshape(-1)
        top = np.argsort(-total, kind='stable')[:keep]
        top_scores = total[top]
        top_rows, top_tokens = top // vocab, top % vocab
        top_seqs = [running[r] + [int(t)]
                    for r, t in zip(top_rows, top_tokens, strict=True)]
        hits = np.array([int(t) in eos or step + 1 >= max_new_tokens for t in top_tokens])
        # Continue with the best candidates that did not just finish.
        live_scores = top_scores + hits.astype(np.float32) * BEAM_MASK
        nxt = np.argsort(-live_scores, kind='stable')[:beams]
        # Finalise candidates among the first `beams` that hit a stop, length-normalised.
        final_scores = top_scores / np.float32((step + 1) ** config.length_penalty)
        if not can_improve:
            final_scores = final_scores + BEAM_MASK
        just_done = hits & (np.arange(keep) < beams)
        final_scores = final_scores + (~just_done).astype(np.float32) * BEAM_MASK
        merged_scores = np.concatenate([finished_scores, final_scores])
        merged_seqs = finished + top_seqs
        merged_flags = np.concatenate([finished_flags, just_done])
        best = np.argsort(-merged_scores, kind='stable')[:beams]
        finished = [merged_seqs[i] for i in best]
        finished_scores = merged_scores[best]
        finished_flags = merged_flags[best]
        running = [top_seqs[i] for i in nxt]
        running_scores = live_scores[nxt]
        step += 1
        best_possible = running_scores[0] / np.float32(step ** config.length_penalty)
        worst_finished = np.where(finished_flags, finished_scores.min(), BEAM_MASK)
        can_improve = can_improve and bool(np.any(best_possible > worst_finished))
        if not can_improve or hits.all():
            break
        session.select(top_rows[nxt].astype(np.int64))
        logits = np.asarray(session.step(np.array([s[-1] for s in running], dtype=np.int64)),
                            dtype=np.float32).reshape(beams, vocab)
    if finish == FINISH_CANCELLED and not finished_flags[0]:
        tokens = running[0]
    else:
        tokens = finished[0]
        if tokens and tokens[-1] in eos:
            finish = FINISH_STOP
    stream = TextStream(decode, config.stop, on_text)
    stopped = stream.update(tokens)
    text = stream.finish()
    if stopped and finish == FINISH_LENGTH:
        finish = FINISH_STOP
    return Generated(tokens, text, finish)
