"""
Concurrent requests on one llama.cpp decoder (continuous batching), beside raw llama.cpp.

One process (``python -m vlm_ros_bench.concurrency SPEC OUT``) holds a pipeline (int8 vision
encoder + the Q8_0 GGUF, ``max_concurrent`` = the largest level) and raw llama.cpp on the same
GGUF. For each level (1, 2, 4, 8 requests), repetition by repetition:

- **ours, own images**: that many requests start together, each about its own image (the
  benchmark image with seeded noise, never seen before: every request encodes its image, one
  image at a time), new_tokens with EOS ignored. Aggregate tokens/s = all generated tokens /
  the time from the start to the last answer; per request: time per output token of its
  decode phase and time to first token from the common start (so it includes the wait for
  the vision encoder);
- **ours, one frame**: the same, but every request asks its own question about one new
  frame (a navigation tree, a planner and an operator asking about the current camera
  image): the frame is encoded once, the others take its features from the cache;
- **raw llama.cpp**: the same number of sequences of the benchmark's prompt length, prefilled
  one after the other, then decoded together, one ``llama_decode`` per step with every
  sequence in it (a KV stream per sequence, llama.cpp's greedy pick): decode tokens/s alone,
  what the machine allows.

The decoder's own count of step batches by size shows how often the requests really ran
together.
"""

import threading
import time

from vlm_ros_bench import common

LEVELS = (1, 2, 4, 8)


def _image(seed):
    import numpy as np

    base = common.bench_image().astype(np.int16)
    noise = np.random.default_rng(2000 + seed).integers(-6, 7, base.shape, dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


QUESTIONS = ('Describe the image. What is the robot doing on the table?',
             'Is there a person in the picture?', 'What colour is the largest object?',
             'Where is the door?', 'How many chairs are there?', 'Is the gripper empty?',
             'What is on the left of the table?', 'Is the path ahead clear?')


def _ours(pipe, prompts, images, new_tokens):
    """Run the requests together; return (wall ms, tokens, tpot list, ttft list)."""
    level = len(images)
    results, firsts, errors = [None] * level, [None] * level, []
    barrier = threading.Barrier(level + 1)

    def run(i):
        def on_token(n):
            if n == 1:
                firsts[i] = time.perf_counter()
        try:
            barrier.wait()
            results[i] = pipe.generate(images[i], prompts[i], max_new_tokens=new_tokens,
                                       ignore_eos=True, on_token=on_token)
        except Exception as exc:  # noqa: B902 -- reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(level)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = (time.perf_counter() - start) * 1000
    if errors:
        raise errors[0]
    tokens = sum(len(r.token_ids) for r in results)
    tpot = [r.timings.decode_ms / max(1, len(r.token_ids) - 1) for r in results]
    ttft = [(f - start) * 1000 for f in firsts]
    return wall, tokens, tpot, ttft


class _RawBatched:
    """llama.cpp alone: n sequences decoded together, one llama_decode per step."""

    def __init__(self, path, threads, n_ctx, max_seqs):
        import numpy as np
        from vlm_ros.engine.runtimes import llamacpp

        L = self.L = llamacpp.lib()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f'llama.cpp cannot load {path}')
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx * max_seqs
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_seqs
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError('llama.cpp cannot create the context')
        self.memory = L.llama_get_memory(self.ctx)
        self.vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.batch = L.llama_batch_init(512, 0, 1)
        self.np = np

    def _decode(self, items):
        b = self.batch
        b.n_tokens = len(items)
        for i, (token, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, want
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f'llama_decode returned {rc}')

    def _greedy(self, row):
        ptr = self.L.llama_get_logits_ith(self.ctx, row)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.vocab,)).argmax())

    def run(self, level, prompt_tokens, new_tokens):
        """Return the decode tokens/s of ``level`` sequences stepping together."""
        np = self.np
        self.L.llama_memory_clear(self.memory, False)
        prompt = np.random.default_rng(0).integers(100, self.vocab - 100, prompt_tokens)
        last = []
        for seq in range(level):
            for at in range(0, prompt_tokens, 512):
                chunk = prompt[at:at + 512]
                self._decode([(int(t), at + k, seq, at + k == prompt_tokens - 1)
                              for k, t in enumerate(chunk)])
            last.append(self._greedy(-1))
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode([(last[s], prompt_tokens + step, s, True) for s in range(level)])
            last = [self._greedy(s) for s in range(level)]
        return level * (new_tokens - 1) / (time.perf_counter() - start)


def measure(spec):
    """Return the concurrency section for one model."""
    import os

    import vlm_ros
    from vlm_ros.engine.datatypes import ImageOptions

    files = spec['files']
    top = max(spec['levels'])
    pipe = vlm_ros.pipeline(spec['model_dir'], **files, n_threads=spec['threads'],
                            n_ctx=spec['n_ctx'], max_concurrent=top, kv_cache_slots=0,
                            feature_cache_mb=64,
                            image_options=ImageOptions(do_image_splitting=False))
    raw = _RawBatched(os.path.join(spec['model_dir'], files['decoder_model']),
                      spec['threads'], spec['n_ctx'], top)
    prompt, new_tokens = spec['prompt'], spec['new_tokens']
    prompt_tokens = pipe.generate(_image(-1), prompt, max_new_tokens=2).prompt_tokens  # warm
    raw.run(1, prompt_tokens, 4)
    raw_tps = {level: [raw.run(level, prompt_tokens, new_tokens) for _ in range(spec['reps'])]
               for level in spec['levels']}

    def own_images(level, rep):
        return [prompt] * level, [_image(100 * rep + i) for i in range(level)]

    def one_frame(level, rep):
        return list(QUESTIONS[:level]), [_image(5000 + 100 * level + rep)] * level

    return {'status': 'ok', 'error': None, 'model': spec['model_name'], 'path': spec['path'],
            'threads': spec['threads'], 'repetitions': spec['reps'], 'new_tokens': new_tokens,
            'prompt_tokens': prompt_tokens,
            'levels': _levels(pipe, spec, own_images, raw_tps),
            'one_frame_levels': _levels(pipe, spec, one_frame, raw_tps)}


def _levels(pipe, spec, requests, raw_tps):
    """Measure every level with ``requests(level, rep)`` -> (prompts, images)."""
    levels = []
    for level in spec['levels']:
        before = dict(pipe.decoder.batch_sizes)
        agg, tpot, ttft = [], [], []
        for rep in range(spec['reps']):
            prompts, images = requests(level, rep)
            wall, tokens, tpots, ttfts = _ours(pipe, prompts, images, spec['new_tokens'])
            agg.append(tokens / wall * 1000)
            tpot += tpots
            ttft += ttfts
        after = pipe.decoder.batch_sizes
        steps = {str(size): after[size] - before.get(size, 0) for size in sorted(after)
                 if after[size] - before.get(size, 0)}
        levels.append({'requests': level, 'aggregate_tokens_per_s': common.summarize(agg),
                       'tpot_ms': common.summarize(tpot), 'ttft_ms': common.summarize(ttft),
                       'raw_decode_tokens_per_s': common.summarize(raw_tps[level]),
                       'step_batches': steps})
    alone = levels[0]['aggregate_tokens_per_s']['median']
    raw_alone = levels[0]['raw_decode_tokens_per_s']['median']
    tpot_alone = levels[0]['tpot_ms']['median']
    for entry in levels:
        entry['speedup'] = entry['aggregate_tokens_per_s']['median'] / alone
        entry['raw_speedup'] = entry['raw_decode_tokens_per_s']['median'] / raw_alone
        entry['tpot_vs_alone'] = entry['tpot_ms']['median'] / tpot_alone
    return levels


def skipped(why, model=None, status='skipped'):
    """Return the section of a run that did not measure concurrency."""
    return {'status': status, 'error': why, 'model': model, 'path': '', 'threads': 0,
            'repetitions': 0, 'new_tokens': 0, 'prompt_tokens': 0, 'levels': [],
            'one_frame_levels': []}


def main(argv=None):
    """Measure in this process: SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.concurrency', measure)


if __name__ == '__main__':
    raise SystemExit(main())
