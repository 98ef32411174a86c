"""
The pipeline: image + prompt in, text with timings out.

``pipeline(model_dir)`` picks the model family from ``config.json`` and the runtime from the
files it is given; the ROS node and the CLI are thin layers over ``Pipeline.generate``.
"""

import queue
import threading
import time
from typing import Callable, Iterator, Optional

from vlm_ros.engine import model_files
from vlm_ros.engine.datatypes import GenerationConfig, Result, Timings
from vlm_ros.engine.errors import ModelFilesError, PromptTooLongError
from vlm_ros.engine.families import load_family
from vlm_ros.engine.families.base import ImageOptions
from vlm_ros.engine.generation import generate
from vlm_ros.engine.images import to_rgb


def _ms(start):
    return (time.perf_counter() - start) * 1000.0


class Pipeline:
    """
    A loaded model: family (preprocessing, prompt) + vision encoder + decoder.

    Sessions are created once here and reused; each call is stateless. Calls from several
    threads are served one at a time.
    """

    def __init__(self, family, vision, decoder, defaults: Optional[GenerationConfig] = None,
                 image_options: Optional[ImageOptions] = None):
        self.family = family
        self.vision = vision
        self.decoder = decoder
        self.defaults = (defaults or GenerationConfig()).validate()
        self.image_options = image_options or ImageOptions()
        self._lock = threading.Lock()

    def __call__(self, inputs, **overrides) -> Result:
        """
        Answer ``(prompt, image)``, ``{'prompt': ..., 'image': ..., 'system_prompt': ...}``.

        A bare string is a text-only prompt; keyword arguments override generation settings.
        """
        if isinstance(inputs, str):
            prompt, image, system = inputs, None, ''
        elif isinstance(inputs, dict):
            prompt = inputs.get('prompt', inputs.get('text', ''))
            image, system = inputs.get('image'), inputs.get('system_prompt', '')
        else:
            prompt, image = inputs
            system = ''
        return self.generate(image, prompt, system_prompt=system, **overrides)

    def generate(self, image=None, prompt='', system_prompt='', *,
                 on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 image_options: Optional[ImageOptions] = None, **overrides) -> Result:
        """
        Answer ``prompt`` about ``image`` (array, PIL image, path or encoded bytes, or None).

        ``on_text`` receives text as it is produced; ``should_stop`` is polled between tokens
        and ends the answer with finish_reason ``cancelled`` when it returns True.
        """
        config = self.defaults.replace(**overrides).validate()
        with self._lock:
            return self._generate(image, prompt, system_prompt, config, on_text, should_stop,
                                  image_options or self.image_options)

    def _generate(self, image, prompt, system_prompt, config, on_text, should_stop,
                  image_options):
        timings = Timings()
        start = time.perf_counter()
        rgb = to_rgb(image) if image is not None else None
        request = self.family.prepare(rgb, prompt, system_prompt, image_options)
        timings.preprocess_ms = _ms(start)

        features = None
        t = time.perf_counter()
        if hasattr(self.vision, 'encode_prompt'):
            # llama.cpp's mtmd tokenizes the prompt around the image while encoding it.
            request, features = self.vision.encode_prompt(request)
        elif request.vision_inputs:
            features = self.vision.encode(request.vision_inputs)
        timings.vision_ms = _ms(t) if features is not None else 0.0

        prompt_len = int(request.input_ids.size)
        budget = min(config.max_new_tokens, self.decoder.context_length - prompt_len)
        if budget < 1:
            raise PromptTooLongError(
                f'prompt of {prompt_len} tokens ({request.num_image_tokens} of them for the '
                f'image) fills the {self.decoder.context_length}-token context')
        t = time.perf_counter()
        session, logits = self.decoder.start(request.input_ids, features,
                                             request.image_token_id)
        timings.prefill_ms = _ms(t)

        t = time.perf_counter()
        out = generate(session, logits, request.input_ids.tolist(), config,
                       self.family.eos_token_ids, self.family.decode, budget,
                       on_text=on_text, should_stop=should_stop)
        timings.decode_ms = _ms(t)
        timings.total_ms = _ms(start)
        return Result(text=out.text, finish_reason=out.finish_reason, token_ids=out.token_ids,
                      prompt_tokens=prompt_len, image_tokens=request.num_image_tokens,
                      timings=timings)

    def stream(self, image=None, prompt='', system_prompt='', **kwargs) -> 'TextIterator':
        """Iterate over text deltas as they are produced; ``.result`` holds the Result."""
        return TextIterator(self, image, prompt, system_prompt, kwargs)

    def close(self):
        """Drop the runtime sessions (memory is freed once no request holds them)."""
        self.vision = self.decoder = None


class TextIterator:
    """Runs one request in a thread and yields its text deltas."""

    _DONE = object()

    def __init__(self, pipe, image, prompt, system_prompt, kwargs):
        self.result: Optional[Result] = None
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None

        def run():
            try:
                self.result = pipe.generate(image, prompt, system_prompt,
                                            on_text=self._queue.put, **kwargs)
            except BaseException as exc:  # re-raised in the consumer's thread
                self._error = exc
            finally:
                self._queue.put(self._DONE)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error


def pipeline(model_dir=None, *, vision_model=None, decoder_model=None, embed_model=None,
             variant='fp32', n_threads=0, n_ctx=0, providers=None, image_options=None,
             model_type='smolvlm', max_beams=4, **generation) -> Pipeline:
    """
    Load a model, ready to answer.

    The runtime follows the files: an ONNX decoder runs in ONNX Runtime, a ``.gguf`` decoder
    in llama.cpp; an ONNX vision encoder feeds either, while an mmproj ``.gguf`` vision model
    lets llama.cpp's own projector encode the image (then ``model_dir`` may be omitted: the
    GGUFs carry tokenizer and chat template, and ``model_type`` picks the fallback template).

    ``variant`` picks the ONNX precision (``fp32``, ``fp16``, ``int8``, ``q4``, ...) when
    files are not named; paths are relative to ``model_dir``. ``n_ctx`` sets a llama.cpp
    context (0: the model's), ``max_beams`` the widest beam search it allows. Remaining
    keyword arguments are default generation settings (see GenerationConfig).
    """
    from vlm_ros.engine.runtimes.onnx import OnnxDecoder, OnnxVisionEncoder, SessionOptions

    defaults = GenerationConfig(**generation)
    if str(vision_model or '').endswith('.gguf'):
        return _mtmd_pipeline(model_dir, vision_model, decoder_model, n_threads, n_ctx,
                              model_type, max_beams, defaults, image_options)
    family = load_family(model_dir)
    options = SessionOptions(n_threads, providers)
    if str(decoder_model or '').endswith('.gguf'):
        from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
        decoder = LlamaCppDecoder(model_files.resolve(model_dir, decoder_model), n_threads,
                                  n_ctx, expected_hidden_size=family.text_hidden_size,
                                  max_beams=max(max_beams, defaults.num_beams))
        vision_path = model_files.resolve(
            model_dir, vision_model or f'onnx/vision_encoder{model_files.variant_suffix(variant)}'
            '.onnx')
    else:
        files = model_files.onnx_files(model_dir, variant, vision_model, decoder_model,
                                       embed_model)
        text = model_files.text_config(model_files.load_json(model_dir, 'config.json'))
        decoder = OnnxDecoder(files.embed, files.decoder, options,
                              hidden_size=family.text_hidden_size,
                              num_layers=text.get('num_hidden_layers', 0),
                              context_length=family.context_length)
        vision_path = files.vision
    vision = OnnxVisionEncoder(vision_path, options, family.text_hidden_size)
    return Pipeline(family, vision, decoder, defaults, image_options)


def _mtmd_pipeline(model_dir, mmproj, decoder_model, n_threads, n_ctx, model_type, max_beams,
                   defaults, image_options):
    from vlm_ros.engine.families.gguf_chat import GgufChatFamily
    from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
    from vlm_ros.engine.runtimes.mtmd import MtmdImageEncoder, MtmdVision

    base = model_dir if model_dir is not None else '.'
    if not str(decoder_model or '').endswith('.gguf'):
        raise ModelFilesError(
            'an mmproj GGUF vision model needs a GGUF language model (llm_model_name)')
    decoder_path = model_files.resolve(base, decoder_model)
    decoder = LlamaCppDecoder(decoder_path, n_threads, n_ctx,
                              max_beams=max(max_beams, defaults.num_beams))
    family = GgufChatFamily(decoder_path, decoder, model_type)
    encoder = MtmdImageEncoder(model_files.resolve(base, mmproj), decoder, n_threads)
    return Pipeline(family, MtmdVision(encoder), decoder, defaults, image_options)
