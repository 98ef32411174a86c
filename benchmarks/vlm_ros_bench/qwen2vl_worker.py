"""
Measure one Qwen2-VL path in this process: ``python -m vlm_ros_bench.qwen2vl_worker SPEC OUT``.

The spec and result are ``worker``'s (one path, its cases, repetitions). Our engine's paths
run through ``worker.PipelineRunner`` unchanged (``vlm_ros.pipeline`` on an ONNX vision
encoder or an mmproj, with the Q4_0 GGUF); this module adds the two runners that are
Qwen2-VL's own:

``TransformersRunner``
    ``Qwen2VLForConditionalGeneration`` in float32 with transformers' processor, phase by
    phase.
``RawMtmdRunner``
    llama.cpp and libmtmd with none of our code: ``mtmd_tokenize``, then libmtmd's helpers
    on each chunk, then llama.cpp's greedy sampler in a plain loop.
"""

import ctypes
import math
import os
import time

from vlm_ros_bench import common, worker

# Qwen2-VL's chat template with one image before the question and its default system turn,
# as the model's chat_template.json renders it; libmtmd writes <|vision_start|> and
# <|vision_end|> around the image itself, so only its media marker stands for the image.
CHATML = ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
          '<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n')


def _ms(start):
    return (time.perf_counter() - start) * 1000.0


class TransformersRunner:
    """
    ``Qwen2VLForConditionalGeneration`` (float32, transformers' default SDPA attention).

    Phases one by one: the processor (chat template, resize, patches), ``get_image_features``,
    one forward pass over the prompt with those features, then one forward per new token
    with the KV cache (M-RoPE positions continue from the prefill's ``rope_deltas``), greedy
    with EOS suppressed. The end-to-end time is the sum of the phases: running ``generate``
    again for it would double a path that is already the slowest by far.
    """

    def __init__(self, spec):
        self.spec = spec
        self.model = None
        self.load_ms = None

    def prepare(self, case):
        if self.model is not None:
            return
        import torch
        from transformers import Qwen2VLForConditionalGeneration
        from vlm_ros_tools.hub_files import quiet_transformers
        from vlm_ros_tools.qwen2vl_factory import load_processor

        torch.set_num_threads(self.spec['threads'])
        start = time.perf_counter()
        with quiet_transformers():
            self.model = Qwen2VLForConditionalGeneration.from_pretrained(
                self.spec['model_dir'], dtype=torch.float32, local_files_only=True).eval()
        self.processor = load_processor(self.spec['model_dir'])
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.load_ms = _ms(start)

    def _inputs(self, pil):
        content = [{'type': 'image'}, {'type': 'text', 'text': self.spec['prompt']}]
        text = self.processor.apply_chat_template([{'role': 'user', 'content': content}],
                                                  add_generation_prompt=True)
        return self.processor(text=text, images=[pil], return_tensors='pt')

    def run(self, case, image):
        import torch
        from PIL import Image
        from vlm_ros_tools.hub_files import quiet_transformers

        model, n = self.model, self.spec['new_tokens']
        pil = Image.fromarray(image)
        with torch.inference_mode(), quiet_transformers():
            start = time.perf_counter()
            inputs = self._inputs(pil)
            preprocess = _ms(start)
            t = time.perf_counter()
            features = model.model.get_image_features(
                inputs['pixel_values'], inputs['image_grid_thw'], return_dict=True)
            vision = _ms(t)
            t = time.perf_counter()
            mask = inputs['attention_mask']
            out = model(input_ids=inputs['input_ids'], attention_mask=mask,
                        image_grid_thw=inputs['image_grid_thw'],
                        mm_token_type_ids=inputs.get('mm_token_type_ids'),
                        mm_encoder_outputs={'image': features}, use_cache=True,
                        logits_to_keep=1)
            logits = out.logits[0, -1]
            prefill = _ms(t)
            t = time.perf_counter()
            for i in range(n):
                logits[self.eos] = -math.inf
                token = int(torch.argmax(logits))
                if i == n - 1:
                    break
                # No attention mask (one unpadded sequence): with one, transformers places
                # the new token at every masked position; without, at the cache length plus
                # the prefill's rope_deltas, as generate() does.
                out = model(input_ids=torch.tensor([[token]]), cache=out.cache,
                            use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1]
            decode = _ms(t)
        ids = inputs['input_ids'][0]
        total = preprocess + vision + prefill + decode
        return worker._rep(preprocess, vision, prefill, decode, n, total,
                           phases_total_ms=total, prompt_tokens=int(ids.shape[0]),
                           image_tokens=int((ids == model.config.image_token_id).sum()))


class RawMtmdRunner:
    """
    llama.cpp's multimodal path as its own tools drive it, no code of ours per step.

    ``mtmd_tokenize`` lays the ChatML prompt out around the image and preprocesses it
    (resize within the pixel budget, normalise); then each chunk goes through libmtmd's
    helpers as ``mtmd_helper_eval_chunks`` takes them -- ``mtmd_helper_eval_chunk_single``
    for text, and for the image ``mtmd_encode_chunk`` followed by
    ``mtmd_helper_decode_image_chunk``, the two halves of what ``eval_chunk_single`` does,
    called apart so the projector's time is known. Then ``new_tokens`` - 1 single-token
    ``llama_decode`` calls, each followed by ``llama_sampler_sample`` (greedy). Context and
    projector settings are llama.cpp's defaults apart from the context size, batch size
    (512, our decoder's), threads and the image token bounds (the processor's pixel budget,
    as our engine passes them). EOS is not checked: the loop always makes ``new_tokens``.
    """

    N_BATCH = 512

    def __init__(self, spec):
        self.spec = spec
        self.ctx = None
        self.load_ms = None

    def prepare(self, case):
        if self.ctx is not None:
            return
        from vlm_ros.engine.runtimes import llamacpp

        L = self.L = llamacpp.lib()  # backend init and log routing only
        from llama_cpp import mtmd_cpp as M
        self.M = M
        # libmtmd's log lines go where llama.cpp's do (not per step; nothing timed).
        M.mtmd_log_set(llamacpp.log_callback(), None)
        M.mtmd_helper_log_set(llamacpp.log_callback(), None)
        start = time.perf_counter()
        files = {k: os.path.join(self.spec['model_dir'], v) for k, v in case['files'].items()
                 if k.endswith('_model')}
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(files['decoder_model'].encode(), params)
        if not self.model:
            raise RuntimeError(f'llama.cpp cannot load {files["decoder_model"]}')
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.spec['n_ctx']
        cparams.n_batch = cparams.n_ubatch = self.N_BATCH
        cparams.n_threads = cparams.n_threads_batch = self.spec['threads']
        cparams.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError('llama.cpp cannot create the context')
        mparams = M.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.n_threads = self.spec['threads']
        low, high = self.spec['image_tokens']
        mparams.image_min_tokens, mparams.image_max_tokens = int(low), int(high)
        self.mctx = M.mtmd_init_from_file(files['vision_model'].encode(), self.model, mparams)
        if not self.mctx:
            raise RuntimeError(f'libmtmd cannot load {files["vision_model"]}')
        marker = (M.mtmd_default_marker() or b'<__media__>')
        marker = marker.decode() if isinstance(marker, bytes) else marker
        self.prompt = CHATML.format(image=marker, prompt=self.spec['prompt']).encode()
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(1, 0, 1)
        self.batch.n_seq_id[0] = 1
        self.batch.seq_id[0][0] = 0
        self.batch.logits[0] = 1
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())
        # The helper's post-decode callback, NULL (ctypes wants a typed function pointer).
        self.no_callback = ctypes.cast(None, M.mtmd_helper_post_decode_callback)
        self.load_ms = _ms(start)

    def _layout(self, image):
        """``mtmd_tokenize`` the prompt around ``image``: return the chunks (caller frees)."""
        M = self.M
        rgb = image
        bitmap = M.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                    rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = M.mtmd_input_chunks_init()
        try:
            text = M.mtmd_input_text()
            text.text = self.prompt
            text.text_len = len(self.prompt)
            text.add_special = False
            text.parse_special = True
            bitmaps = (ctypes.c_void_p * 1)(bitmap)
            rc = M.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise RuntimeError(f'mtmd_tokenize returned {rc}')
        except BaseException:
            M.mtmd_input_chunks_free(chunks)
            raise
        finally:
            M.mtmd_bitmap_free(bitmap)
        return chunks

    def run(self, case, image):
        import numpy as np

        L, M, n_new = self.L, self.M, self.spec['new_tokens']
        image = np.ascontiguousarray(image)
        L.llama_memory_clear(self.memory, True)
        L.llama_sampler_reset(self.sampler)
        L.llama_perf_context_reset(self.ctx)
        start = time.perf_counter()
        chunks = self._layout(image)
        preprocess = _ms(start)
        vision = prefill = 0.0
        n_past, tokens, image_tokens = 0, 0, 0
        new_past = L.llama_pos(0)
        try:
            count = M.mtmd_input_chunks_size(chunks)
            for i in range(count):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                tokens += n
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    image_tokens += n
                    t = time.perf_counter()
                    if M.mtmd_encode_chunk(self.mctx, chunk) != 0:
                        raise RuntimeError('mtmd_encode_chunk failed')
                    vision += _ms(t)
                    t = time.perf_counter()
                    rc = M.mtmd_helper_decode_image_chunk(
                        self.mctx, self.ctx, chunk, M.mtmd_get_output_embd(self.mctx),
                        n_past, 0, self.N_BATCH, ctypes.byref(new_past), self.no_callback,
                        None)
                else:
                    t = time.perf_counter()
                    rc = M.mtmd_helper_eval_chunk_single(
                        self.mctx, self.ctx, chunk, n_past, 0, self.N_BATCH, i == count - 1,
                        ctypes.byref(new_past))
                prefill += _ms(t)
                if rc != 0:
                    raise RuntimeError(f'libmtmd helper returned {rc} on chunk {i}')
                n_past = int(new_past.value)
        finally:
            M.mtmd_input_chunks_free(chunks)
        t = time.perf_counter()
        token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        batch = self.batch
        for step in range(n_new - 1):
            batch.token[0] = token
            batch.pos[0] = n_past + step
            batch.n_tokens = 1
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f'llama_decode returned {rc}')
            token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        decode = _ms(t)
        perf = L.llama_perf_context(self.ctx)
        native = {'prompt_eval_ms': perf.t_p_eval_ms, 'prompt_tokens': perf.n_p_eval,
                  'eval_ms': perf.t_eval_ms, 'eval_tokens': perf.n_eval}
        return worker._rep(preprocess, vision, prefill, decode, n_new,
                           preprocess + vision + prefill + decode, llama_perf=native,
                           llama_tpot_ms=(perf.t_eval_ms / perf.n_eval if perf.n_eval
                                          else None),
                           prompt_tokens=tokens, image_tokens=image_tokens)


RUNNERS = {'pipeline': worker.PipelineRunner, 'mtmd': worker.PipelineRunner,
           'transformers': TransformersRunner, 'raw-mtmd': RawMtmdRunner}


def run_spec(spec):
    """Run every case of ``spec`` with the Qwen2-VL runners."""
    return worker.run_spec(spec, RUNNERS)


def main(argv=None):
    """Read a spec file, run it, write the result file."""
    return common.spec_main(argv, 'vlm_ros_bench.qwen2vl_worker', run_spec)


if __name__ == '__main__':
    raise SystemExit(main())
