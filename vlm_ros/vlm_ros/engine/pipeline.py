"""
The local pipeline: images + prompt in, text with timings out.

Four stages, each behind one small interface: the model family prepares the request
(preprocessing, prompt layout), the vision stage turns it into features (``encode(request)
-> (request, features)``: ONNX Runtime or libmtmd), the decoder prefills and steps (ONNX
Runtime or llama.cpp), and ``generation`` picks the tokens. ``loader.pipeline()`` builds one.
"""

import threading
import time
from typing import Callable, Optional

from vlm_ros.engine import grounding
from vlm_ros.engine.answerer import Answerer
from vlm_ros.engine.caches import FeatureCache, image_key
from vlm_ros.engine.datatypes import (FINISH_CANCELLED, GenerationConfig, ImageOptions,
                                      Result, Timings)
from vlm_ros.engine.errors import Cancelled, PromptTooLongError
from vlm_ros.engine.families.base import conversation
from vlm_ros.engine.generation import generate


def _ms(start):
    return (time.perf_counter() - start) * 1000.0


def _ignore(_phase):
    pass


class Pipeline(Answerer):
    """
    A loaded model: family + vision stage + decoder.

    Sessions are created once and reused; each call is stateless. Calls from several
    threads encode their images one at a time; they decode together up to the decoder's
    ``max_concurrent`` (llama.cpp: continuous batching), the others wait their turn.
    """

    def __init__(self, family, vision, decoder, defaults: Optional[GenerationConfig] = None,
                 image_options: Optional[ImageOptions] = None, feature_cache_mb: float = 0):
        self.family = family
        self.vision = vision
        self.decoder = decoder
        self.defaults = (defaults or GenerationConfig()).validate()
        self.image_options = image_options or ImageOptions()
        # Per-image features only where the vision stage encodes image by image (libmtmd
        # encodes the prompt's images itself).
        self.feature_cache = FeatureCache(int(feature_cache_mb * 2**20)) if \
            feature_cache_mb > 0 and vision.encodes_per_image else None
        self._vision_lock = threading.Lock()
        self.max_concurrent = getattr(decoder, 'max_concurrent', 1)
        self._decoding = threading.BoundedSemaphore(self.max_concurrent)

    def generate(self, images=None, prompt='', system_prompt='', *, history=(),
                 on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_phase: Optional[Callable[[str], None]] = None,
                 on_token: Optional[Callable[[int], None]] = None,
                 image_options: Optional[ImageOptions] = None, **overrides) -> Result:
        """Answer ``prompt`` about ``images``; see ``Answerer.generate``."""
        config = self.defaults.replace(**overrides).validate()
        args = (images, prompt, system_prompt, history, config, on_text, should_stop,
                on_phase or _ignore, on_token, image_options or self.image_options)
        if self.max_concurrent == 1:  # one request from preprocessing to the last token
            with self._decoding:
                return self._generate(*args)
        return self._generate(*args)

    def _generate(self, images, prompt, system_prompt, history, config, on_text, should_stop,
                  on_phase, on_token, image_options):
        timings = Timings()
        start = time.perf_counter()
        on_phase('preprocess')
        rgbs, turns = conversation(images, history)  # every image, the history's first
        first_index = sum(n for _, n in turns)
        first_image = rgbs[first_index:][:1]
        keys, known = self._cached_features(rgbs, image_options)
        request = self.family.prepare(images, prompt, system_prompt, image_options, history,
                                      skip={i for i, f in enumerate(known) if f is not None})
        if self.feature_cache is not None:
            request.image_features = known
        timings.preprocess_ms = _ms(start)

        t = time.perf_counter()
        encoded = any(f is None for f in known)
        if encoded:
            on_phase('vision')
        with self._vision_lock:
            if self.feature_cache is not None and encoded:
                # Callers asking about one frame at the same time: the first encodes it,
                # the others find its features here instead of encoding it again.
                request.image_features = [
                    f if f is not None else self.feature_cache.get(key)
                    for f, key in zip(request.image_features, keys, strict=True)]
            request, features = self.vision.encode(request)
        timings.vision_ms = _ms(t) if features is not None and encoded else 0.0
        if self.feature_cache is not None:
            for key, old, new in zip(keys, known, request.image_features, strict=True):
                if old is None:
                    self.feature_cache.put(key, new)

        prompt_len = int(request.input_ids.size)
        budget = min(config.max_new_tokens, self.decoder.context_length - prompt_len)
        if budget < 1:
            raise PromptTooLongError(
                f'prompt of {prompt_len} tokens ({request.num_image_tokens} of them for the '
                f'images) fills the {self.decoder.context_length}-token context')
        if should_stop is not None and should_stop():  # cancelled while encoding the images
            timings.total_ms = _ms(start)
            return Result(text='', finish_reason=FINISH_CANCELLED,
                          prompt_tokens=prompt_len, image_tokens=request.num_image_tokens,
                          timings=timings, backend='local')
        on_phase('prefill')
        if self.max_concurrent == 1:
            out, session = self._decode(request, features, config, budget, timings, on_phase,
                                        on_text, should_stop, on_token)
        else:
            with self._decoding:
                out, session = self._decode(request, features, config, budget, timings,
                                            on_phase, on_text, should_stop, on_token)
        if out is None:
            timings.total_ms = _ms(start)
            return Result(text='', finish_reason=FINISH_CANCELLED, prompt_tokens=prompt_len,
                          image_tokens=request.num_image_tokens, timings=timings,
                          backend='local')
        result = Result(text=out.text, finish_reason=out.finish_reason,
                        token_ids=out.token_ids, prompt_tokens=prompt_len,
                        image_tokens=request.num_image_tokens, timings=timings,
                        cached_tokens=session.cached_tokens, backend='local')
        box_format = getattr(self.family.info, 'box_format', '')
        if box_format and first_image:
            # Relative boxes need only the original size, whatever resizing or tiling the
            # family did; absolute ones the size the model saw, which the family (or
            # libmtmd's layout) tells.
            height, width = first_image[0].shape[:2]
            seen = request.seen_sizes[first_index] if len(request.seen_sizes) > first_index \
                else None
            found = grounding.locate(out.text, box_format, (width, height), seen)
            result.detections, result.dropped_boxes = found.boxes, found.dropped
        timings.total_ms = _ms(start)
        return result

    def _decode(self, request, features, config, budget, timings, on_phase, on_text,
                should_stop, on_token):
        """Prefill and answer; return (generated, session), or (None, None) if cancelled."""
        t = time.perf_counter()
        try:
            extra = {} if request.positions is None else {'positions': request.positions}
            session, logits = self.decoder.start(request.input_ids, features,
                                                 request.image_token_id, should_stop, **extra)
        except Cancelled:
            timings.prefill_ms = _ms(t)
            return None, None
        try:
            timings.prefill_ms = _ms(t)
            on_phase('decode')
            t = time.perf_counter()
            out = generate(session, logits, request.input_ids.tolist(), config,
                           self.family.eos_token_ids, self.family.decode, budget,
                           on_text=on_text, should_stop=should_stop, on_token=on_token)
            timings.decode_ms = _ms(t)
            self.decoder.keep(session, out.token_ids)
        finally:
            session.close()
        return out, session

    def _cached_features(self, rgbs, image_options):
        """Return (cache keys, features known per image or None) for the request's images."""
        if self.feature_cache is None:
            return [], [None] * len(rgbs)
        keys = [image_key(rgb, image_options) for rgb in rgbs]
        return keys, [self.feature_cache.get(key) for key in keys]

    def close(self):
        """Drop the runtime sessions and caches (memory is freed once no request holds them)."""
        if self.feature_cache is not None:
            self.feature_cache.clear()
        self.vision = self.decoder = None
