"""
Measure one path in this process: ``python -m vlm_ros_bench.worker SPEC.json OUT.json``.

The orchestrator starts one worker per path (and, unless told to group them, per split
setting), so the peak RSS a worker reports belongs to that path alone. A spec names the
path, the model folder, threads, token counts, repetitions and the cases (split off / on
with their files); the output holds per-repetition timings of every case. Heavy imports
happen inside the path's own function: an ONNX Runtime worker never loads torch.
"""

import math
import sys
import time
import traceback

from vlm_ros_bench import common


def _ms(start):
    return (time.perf_counter() - start) * 1000.0


def _rep(preprocess, vision, prefill, decode, new_tokens, e2e, **extra):
    steps = new_tokens - 1
    out = {'preprocess_ms': preprocess, 'vision_ms': vision, 'prefill_ms': prefill,
           'decode_ms': decode, 'new_tokens': new_tokens, 'e2e_ms': e2e,
           'tpot_ms': decode / steps if steps > 0 else None}
    out.update(extra)
    return out


# -- our pipeline (ONNX Runtime / llama.cpp decoders, ONNX or mtmd vision) ------------------

class PipelineRunner:
    """Our engine: ``vlm_ros.pipeline`` on the case's files."""

    def __init__(self, spec):
        self.spec = spec
        self.pipe = None
        self.files = None
        self.load_ms = None

    def prepare(self, case):
        import vlm_ros

        files = {k: v for k, v in case['files'].items() if k.endswith('_model')}
        if files == self.files:
            return
        self.pipe = None
        start = time.perf_counter()
        # No reuse between repetitions: every one pays vision and prefill (the reuse
        # benchmark, reuse.py, measures the caches).
        kwargs = {'n_threads': self.spec['threads'], 'feature_cache_mb': 0,
                  'kv_cache_slots': 0}
        if str(files.get('decoder_model', '')).endswith('.gguf'):
            kwargs['n_ctx'] = self.spec['n_ctx']
        if self.spec['path']['onnx_variant']:
            kwargs['variant'] = self.spec['path']['onnx_variant']
        self.pipe = vlm_ros.pipeline(self.spec['model_dir'], **files, **kwargs)
        self.files = files
        self.load_ms = _ms(start)

    def run(self, case, image):
        from vlm_ros.engine.datatypes import ImageOptions

        options = ImageOptions(do_image_splitting=bool(case['split']))
        start = time.perf_counter()
        result = self.pipe.generate(image, self.spec['prompt'],
                                    max_new_tokens=self.spec['new_tokens'], ignore_eos=True,
                                    image_options=options)
        e2e = _ms(start)
        t = result.timings
        return _rep(t.preprocess_ms, t.vision_ms, t.prefill_ms, t.decode_ms,
                    result.completion_tokens, e2e, engine_total_ms=t.total_ms,
                    prompt_tokens=result.prompt_tokens, image_tokens=result.image_tokens)


# -- transformers reference -----------------------------------------------------------------

class TransformersRunner:
    """
    SmolVLMForConditionalGeneration (eager attention, float32) with transformers' processor.

    Phases are timed one by one -- processor, ``get_image_features``, one forward pass over
    the prompt with those features, then one forward per new token with a KV cache -- and
    the end-to-end time is ``processor`` + ``generate`` (EOS suppressed with
    ``min_new_tokens``), measured separately.
    """

    def __init__(self, spec):
        self.spec = spec
        self.model = None
        self.load_ms = None

    def prepare(self, case):
        if self.model is not None:
            return
        import torch
        from transformers import SmolVLMForConditionalGeneration
        from vlm_ros_tools.smolvlm_factory import load_processor, quiet_transformers

        torch.set_num_threads(self.spec['threads'])
        start = time.perf_counter()
        with quiet_transformers():
            self.model = SmolVLMForConditionalGeneration.from_pretrained(
                self.spec['model_dir'], attn_implementation='eager', dtype=torch.float32,
                local_files_only=True).eval()
        self.processor = load_processor(self.spec['model_dir'])
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.load_ms = _ms(start)

    def _inputs(self, pil, split):
        content = [{'type': 'image'}, {'type': 'text', 'text': self.spec['prompt']}]
        text = self.processor.apply_chat_template([{'role': 'user', 'content': content}],
                                                  add_generation_prompt=True)
        return self.processor(text=text, images=[pil], return_tensors='pt',
                              do_image_splitting=bool(split))

    def run(self, case, image):
        import torch
        from PIL import Image

        from vlm_ros_tools.smolvlm_factory import quiet_transformers

        model, n = self.model, self.spec['new_tokens']
        pil = Image.fromarray(image)
        with torch.inference_mode(), quiet_transformers():
            start = time.perf_counter()
            inputs = self._inputs(pil, case['split'])
            preprocess = _ms(start)
            t = time.perf_counter()
            features = model.model.get_image_features(
                inputs['pixel_values'], inputs['pixel_attention_mask'], return_dict=True)
            vision = _ms(t)
            t = time.perf_counter()
            mask = inputs['attention_mask']
            out = model(input_ids=inputs['input_ids'], attention_mask=mask,
                        mm_encoder_outputs={'image': features}, use_cache=True,
                        logits_to_keep=1)
            logits = out.logits[0, -1]
            prefill = _ms(t)
            t = time.perf_counter()
            ones = torch.ones((1, 1), dtype=mask.dtype)
            for i in range(n):
                logits[self.eos] = -math.inf
                token = int(torch.argmax(logits))
                if i == n - 1:
                    break
                mask = torch.cat([mask, ones], dim=1)
                out = model(input_ids=torch.tensor([[token]]), attention_mask=mask,
                            past_key_values=out.past_key_values, use_cache=True,
                            logits_to_keep=1)
                logits = out.logits[0, -1]
            decode = _ms(t)
            t = time.perf_counter()
            inputs = self._inputs(pil, case['split'])
            generated = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False)
            e2e = _ms(t)
        ids = inputs['input_ids'][0]
        return _rep(preprocess, vision, prefill, decode, n, e2e,
                    generate_new_tokens=int(generated.shape[1] - ids.shape[0]),
                    phases_total_ms=preprocess + vision + prefill + decode,
                    prompt_tokens=int(ids.shape[0]),
                    image_tokens=int((ids == model.config.image_token_id).sum()))


# -- raw llama.cpp ----------------------------------------------------------------------------

class RawLlamaRunner:
    """
    llama.cpp's own loop, none of our code per token: llama_decode + its greedy sampler.

    The prompt is random token ids of the same length as the pipeline's prompt (image
    positions included), decoded in n_batch chunks; then ``new_tokens`` - 1 single-token
    decodes, each followed by ``llama_sampler_sample``. Context parameters are llama.cpp's
    defaults apart from the context size, batch size and threads. llama.cpp's own perf
    counters (``llama_perf_context``) are reported too.
    """

    N_BATCH = 512

    def __init__(self, spec):
        self.spec = spec
        self.ctx = None
        self.load_ms = None

    def prepare(self, case):
        if self.ctx is not None:
            return
        import os

        import numpy as np
        from vlm_ros.engine.runtimes import llamacpp

        L = self.L = llamacpp.lib()  # backend init and log routing only
        start = time.perf_counter()
        path = os.path.join(self.spec['model_dir'], case['files']['decoder_model'])
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f'llama.cpp cannot load {path}')
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.spec['n_ctx']
        cparams.n_batch = cparams.n_ubatch = self.N_BATCH
        cparams.n_threads = cparams.n_threads_batch = self.spec['threads']
        cparams.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError('llama.cpp cannot create the context')
        self.memory = L.llama_get_memory(self.ctx)
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.batch = L.llama_batch_init(self.N_BATCH, 0, 1)
        b = self.batch
        self.tokens = np.ctypeslib.as_array(b.token, shape=(self.N_BATCH,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(self.N_BATCH,))
        self.want = np.ctypeslib.as_array(b.logits, shape=(self.N_BATCH,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.N_BATCH,))[:] = 1
        for i in range(self.N_BATCH):
            b.seq_id[i][0] = 0
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())
        self.load_ms = _ms(start)

    def _decode(self, n):
        self.batch.n_tokens = n
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f'llama_decode returned {rc}')

    def run(self, case, image):
        import numpy as np

        L, n_new = self.L, self.spec['new_tokens']
        length = int(case['prompt_tokens'])
        prompt = np.random.default_rng(0).integers(100, self.n_vocab - 100, length)
        L.llama_memory_clear(self.memory, False)
        L.llama_sampler_reset(self.sampler)
        L.llama_perf_context_reset(self.ctx)
        start = time.perf_counter()
        for at in range(0, length, self.N_BATCH):
            chunk = prompt[at:at + self.N_BATCH]
            k = len(chunk)
            self.tokens[:k] = chunk
            self.pos[:k] = np.arange(at, at + k)
            self.want[:k] = 0
            if at + k == length:
                self.want[k - 1] = 1
            self._decode(k)
        prefill = _ms(start)
        t = time.perf_counter()
        token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        for step in range(n_new - 1):
            self.tokens[0] = token
            self.pos[0] = length + step
            self.want[0] = 1
            self._decode(1)
            token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        decode = _ms(t)
        perf = L.llama_perf_context(self.ctx)
        native = {'prompt_eval_ms': perf.t_p_eval_ms, 'prompt_tokens': perf.n_p_eval,
                  'eval_ms': perf.t_eval_ms, 'eval_tokens': perf.n_eval}
        return _rep(None, None, prefill, decode, n_new, prefill + decode, llama_perf=native,
                    llama_tpot_ms=(perf.t_eval_ms / perf.n_eval if perf.n_eval else None),
                    prompt_tokens=length, image_tokens=0)


RUNNERS = {'pipeline': PipelineRunner, 'mtmd': PipelineRunner,
           'transformers': TransformersRunner, 'raw': RawLlamaRunner}


def run_spec(spec, runners=None):
    """Run every case of ``spec`` (``runners``: kind -> class); return the JSON-ready result."""
    image = common.bench_image(spec['image_size'])
    runner = (runners or RUNNERS)[spec['path']['kind']](spec)
    cases = []
    for case in spec['cases']:
        common.reset_peak_rss()
        out = {'split': bool(case['split']), 'status': 'ok', 'error': None, 'reps': [],
               'warmup_reps': [], 'load_ms': None, 'rss_start_mb': common.rss_mb(),
               'rss_after_load_mb': None, 'peak_rss_mb': None, 'files': case['files']}
        try:
            runner.prepare(case)
            out['load_ms'] = runner.load_ms
            out['rss_after_load_mb'] = common.rss_mb()
            for i in range(spec['warmup'] + spec['reps']):
                rep = runner.run(case, image)
                (out['warmup_reps'] if i < spec['warmup'] else out['reps']).append(rep)
                print(f'[worker] {spec["path"]["name"]} split={case["split"]} run {i + 1}: '
                      f'e2e {rep["e2e_ms"]:.0f} ms, TPOT {rep["tpot_ms"] or 0:.2f} ms',
                      file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: B902 -- reported per case, the others still run
            out['status'] = 'error'
            out['error'] = f'{type(exc).__name__}: {exc}'
            out['traceback'] = traceback.format_exc()[-4000:]
        out['peak_rss_mb'] = common.peak_rss_mb()
        cases.append(out)
    return {'path': spec['path']['name'], 'threads': spec['threads'], 'cases': cases}


def main(argv=None):
    """Read a spec file, run it, write the result file."""
    return common.spec_main(argv, 'vlm_ros_bench.worker', run_spec)


if __name__ == '__main__':
    raise SystemExit(main())
