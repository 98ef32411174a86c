"""
Where a decode step's time goes in our own code, at a real model size.

``python -m vlm_ros_bench profile`` loads the pipeline of each path in this process, answers
the benchmark question once to warm up, then

1. times the runtime's own native calls during the decode loop by wrapping them (ONNX
   Runtime's ``run_with_ort_values`` and the embedder's ``run``; llama.cpp's
   ``llama_decode`` and ``llama_get_logits_ith``): the rest of the time per token is ours
   (over ``--repeat`` answers, the one with the least time outside the runtime is kept);
2. runs the decode loop under cProfile and lists our functions by own time;
3. micro-benchmarks the per-token pieces of our loop on real-size data: ``process_logits``
   + ``argmax`` over the 49280 logits, ``TextStream.update`` (re-decodes the whole answer)
   at several answer lengths, and the per-step input preparation of the ONNX session;
4. for llama.cpp decoders, times the prefill of the prompt as laid out (alternating runs of
   text tokens and image embeddings, one ``llama_decode`` each) against the same length in
   one run.

The engine is not modified: wrappers are installed on this process's objects only.
Results go to ``<out>/profile.txt`` and ``profile.json``.
"""

import cProfile
import io
import json
import os
import pstats
import sys
import time

from vlm_ros_bench import common, models, paths

DEFAULT_PATHS = ('onnx-fp32', 'onnx-int8-vision+llamacpp-q8_0')


class _Timer:
    """Accumulates the wall time of the calls it wraps."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def native_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return native_call


class _LibProxy:
    """The llama_cpp module with some functions timed (installed as ``decoder._ll``)."""

    def __init__(self, lib, timers):
        self._lib = lib
        for name, timer in timers.items():
            setattr(self, name, timer.wrap(getattr(lib, name)))

    def __getattr__(self, name):
        return getattr(self._lib, name)


def _timed_generate(pipeline_module, sink, profiler=None, timers=()):
    """Wrap the pipeline's decode loop (``generation.generate``) to time or profile it."""
    original = pipeline_module.generate

    def generate(*args, **kwargs):
        for timer in timers:  # count native time of the decode loop only, not the prefill
            timer.seconds, timer.calls = 0.0, 0
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            return original(*args, **kwargs)
        finally:
            if profiler is not None:
                profiler.disable()
            sink.append(time.perf_counter() - start)

    pipeline_module.generate = generate
    return original


def _native_timers(pipe):
    decoder = pipe.decoder
    timers = {}
    if hasattr(decoder, 'session'):  # ONNX Runtime
        timers['decoder run_with_ort_values'] = _Timer()
        timers['embed_tokens run'] = _Timer()
        decoder.session.run_with_ort_values = timers['decoder run_with_ort_values'].wrap(
            decoder.session.run_with_ort_values)
        decoder.embed.run = timers['embed_tokens run'].wrap(decoder.embed.run)
    else:  # llama.cpp
        lib_timers = {'llama_decode': _Timer(), 'llama_get_logits_ith': _Timer()}
        decoder._ll = _LibProxy(decoder._ll, lib_timers)
        timers = {f'llama.cpp {k}': v for k, v in lib_timers.items()}
    return timers


def _our_functions(profiler, limit=25):
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats('tottime')
    rows = []
    for (filename, line, name), (_, nc, tt, ct, _) in stats.stats.items():
        rows.append({'function': f'{os.path.basename(filename)}:{line}({name})',
                     'ours': f'vlm_ros{os.sep}engine' in filename, 'calls': nc,
                     'tottime_ms': tt * 1000.0, 'cumtime_ms': ct * 1000.0})
    rows.sort(key=lambda r: -r['tottime_ms'])
    return rows[:limit]


def _micro(pipe, result, repeat=200):
    """Micro-benchmark per-token pieces of our loop on this model's real sizes."""
    import numpy as np
    from vlm_ros.engine.datatypes import GenerationConfig
    from vlm_ros.engine.generation import process_logits, TextStream

    out = {}
    vocab = pipe.decoder.vocab_size if hasattr(pipe.decoder, 'vocab_size') else None
    vocab = vocab or int(pipe.family.tokenizer.vocab_size)
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    config = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    eos = pipe.family.eos_token_ids
    seq = list(range(100))

    def bench(fn, batches=5):
        fn()
        best = float('inf')
        for _ in range(batches):  # best batch: robust against other load on the machine
            start = time.perf_counter()
            for _ in range(repeat // batches):
                fn()
            best = min(best, (time.perf_counter() - start) / (repeat // batches))
        return best * 1e6

    out['process_logits + argmax us'] = bench(
        lambda: int(np.argmax(process_logits(np.array(logits), seq, config, eos, 10))))
    tokens = list(result.token_ids)
    # Longer answers than this one: its tokens repeated (the cost grows with the length).
    longer = (tokens * (1024 // max(len(tokens), 1) + 1))[:1024]
    for n in (16, len(tokens), 256, 1024):
        stream = TextStream(pipe.family.decode)
        out[f'TextStream.update at {n} tokens us'] = bench(
            lambda n=n, stream=stream: stream.update(longer[:n]))
    detok = pipe.family.tokenizer.detokenizer()
    detok.add_many(tokens[:-1])
    state = (list(detok.token_ids), detok.text, detok._prefix, detok._read)

    def incremental():
        detok.token_ids, detok.text, detok._prefix, detok._read = list(state[0]), *state[1:]
        detok.add(tokens[-1])

    out[f'IncrementalDetokenizer.add at {len(tokens)} tokens us'] = bench(incremental)
    decoder = pipe.decoder
    if hasattr(decoder, 'session'):
        from vlm_ros.engine.runtimes.onnx import OnnxDecoderSession

        session = OnnxDecoderSession(decoder)
        ortvalue = session._ortvalue
        total = result.prompt_tokens + len(tokens)

        def feed():
            ortvalue(np.ones((1, total), dtype=np.int64))
            ortvalue(np.ascontiguousarray(np.broadcast_to(
                np.arange(total - 1, total, dtype=np.int64), (1, 1))))
            ortvalue(np.zeros((1, 1, decoder.hidden_size), np.float32))

        out['onnx per-step feed (mask, positions, embeds OrtValues) us'] = bench(feed)
        one = np.zeros((1, 1, vocab), np.float32)
        out['onnx logits [1,1,vocab] -> float32 row us'] = bench(
            lambda: np.asarray(one[:, -1, :], dtype=np.float32))
        ids = np.array([[5]], dtype=np.int64)
        out['onnx embed_tokens run (1 token) us'] = bench(
            lambda: decoder.embed.run(None, {'input_ids': ids}))
    else:
        import ctypes

        row = np.empty((1, vocab), np.float32)
        ptr = decoder._ll.llama_get_logits_ith(decoder._ctx, -1)
        out['llama.cpp LlamaCppDecoder._logits(1) us'] = bench(lambda: decoder._logits(1))
        out['llama.cpp np.ctypeslib.as_array(ptr) alone us'] = bench(
            lambda: np.ctypeslib.as_array(ptr, shape=(vocab,)))
        out['llama.cpp logits by ctypes.memmove us'] = bench(
            lambda: ctypes.memmove(row.ctypes.data, ptr, vocab * 4))
    return out


def _prefill_layout(pipe, split, repeat=3):
    """
    Time llama.cpp's prefill of the real prompt against the same length in one run.

    The prompt alternates text tokens and image embeddings (with splitting: 35 runs for 17
    tiles), and every run is its own ``llama_decode`` call that reads all the weights; the
    comparison feeds every position as an embedding, in ``n_batch`` chunks.
    """
    import numpy as np
    from vlm_ros.engine.datatypes import ImageOptions

    decoder = pipe.decoder
    request = pipe.family.prepare(common.bench_image(), common.PROMPT, '',
                                  ImageOptions(do_image_splitting=split))
    ids, image_id = request.input_ids, request.image_token_id
    slots = ids == image_id
    rng = np.random.default_rng(0)
    features = rng.standard_normal((int(slots.sum()), decoder.hidden_size)).astype(np.float32)
    every = rng.standard_normal((ids.size, decoder.hidden_size)).astype(np.float32)

    def best(fn):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
        return min(times)

    return {
        'prompt_tokens': int(ids.size),
        'runs': int(np.count_nonzero(np.diff(slots.astype(np.int8)))) + 1,
        'interleaved_ms': best(lambda: decoder.start(ids, features * 0.02, image_id)),
        'one_run_of_embeddings_ms': best(
            lambda: decoder.start(np.full(ids.size, image_id), every * 0.02, image_id)),
        'all_token_ids_ms': best(lambda: decoder.start(np.where(slots, 100, ids))),
    }


def profile_path(manifest, path, new_tokens, split, threads, n_ctx, repeat=3):
    """Profile one path; return a JSON-ready dict."""
    import vlm_ros
    from vlm_ros.engine import pipeline as pipeline_module
    from vlm_ros.engine.datatypes import ImageOptions

    files = {k: v for k, v in paths.case_files(path, manifest, split).items()
             if k.endswith('_model')}
    kwargs = {'n_threads': threads, 'feature_cache_mb': 0, 'kv_cache_slots': 0}
    if path.gguf_type:
        kwargs['n_ctx'] = n_ctx
    if path.onnx_variant:
        kwargs['variant'] = path.onnx_variant
    pipe = vlm_ros.pipeline(manifest['model_dir'], **files, **kwargs)
    image = common.bench_image()
    options = ImageOptions(do_image_splitting=split)

    def answer():
        return pipe.generate(image, common.PROMPT, max_new_tokens=new_tokens, ignore_eos=True,
                             image_options=options)

    answer()  # warm-up
    timers = _native_timers(pipe)
    loops = []
    original = _timed_generate(pipeline_module, loops, timers=list(timers.values()))
    samples = []
    try:
        for _ in range(repeat):  # the answer with the least time outside the runtime wins
            result = answer()
            steps = len(result.token_ids) - 1
            native = {name: {'ms_per_token': t.seconds * 1000.0 / max(steps, 1),
                             'calls': t.calls} for name, t in timers.items()}
            tpot = loops[-1] * 1000.0 / max(steps, 1)
            ours = tpot - sum(v['ms_per_token'] for v in native.values())
            samples.append((ours, tpot, native))
        ours, tpot, native = min(samples, key=lambda x: x[0])
        profiler = cProfile.Profile()
        pipeline_module.generate = original
        _timed_generate(pipeline_module, loops, profiler)
        answer()
    finally:
        pipeline_module.generate = original
    return {
        'path': path.name, 'split': split, 'new_tokens': len(result.token_ids),
        'prompt_tokens': result.prompt_tokens, 'tpot_ms': tpot,
        'native_ms_per_token': native, 'ours_ms_per_token': ours,
        'ours_fraction': ours / tpot if tpot else None,
        'repeat': repeat, 'all_ours_ms_per_token': [x[0] for x in samples],
        'all_tpot_ms': [x[1] for x in samples],
        'top_functions_by_own_time': _our_functions(profiler),
        'micro_us': _micro(pipe, result),
        'prefill_layout': _prefill_layout(pipe, split) if path.gguf_type else None,
    }


def _text(results):
    lines = []
    for r in results:
        lines += [f'== {r["model"]} {r["path"]} (split {"on" if r["split"] else "off"}, '
                  f'{r["prompt_tokens"]} prompt tokens, {r["new_tokens"]} new tokens)',
                  f'TPOT {r["tpot_ms"]:.2f} ms; ours {r["ours_ms_per_token"]:.3f} ms/token '
                  f'({100 * (r["ours_fraction"] or 0):.1f}%)']
        for name, v in r['native_ms_per_token'].items():
            lines.append(f'  native {name}: {v["ms_per_token"]:.3f} ms/token '
                         f'({v["calls"]} calls)')
        layout = r.get('prefill_layout')
        if layout:
            lines.append(f'  prefill of {layout["prompt_tokens"]} positions: as the prompt lays '
                         f'them out ({layout["runs"]} runs) {layout["interleaved_ms"]:.0f} ms, '
                         f'all embeddings in one run {layout["one_run_of_embeddings_ms"]:.0f} '
                         f'ms, all token ids {layout["all_token_ids_ms"]:.0f} ms (best of 3)')
        lines.append('  micro-benchmarks (us per call):')
        for name, us in r['micro_us'].items():
            lines.append(f'    {name}: {us:.1f}')
        lines.append('  cProfile, top functions by own time (decode loop only; ours marked *; '
                     'native_call = the timed runtime calls):')
        for f in r['top_functions_by_own_time']:
            lines.append(f'    {"*" if f["ours"] else " "} {f["tottime_ms"]:9.2f} ms '
                         f'{f["calls"]:6d} calls  {f["function"]}')
        lines.append('')
    return '\n'.join(lines)


def main(argv=None):
    """Command line: profile the decode loop of some paths, write profile.txt/.json."""
    import argparse

    parser = argparse.ArgumentParser(prog='python -m vlm_ros_bench profile',
                                     description='Profile our decode loop at a real size.')
    parser.add_argument('--model', default='smolvlm2-256m')
    parser.add_argument('--tiny', action='store_true', help='the tiny test model instead')
    parser.add_argument('--paths', default=','.join(DEFAULT_PATHS))
    parser.add_argument('--new-tokens', type=int, default=64)
    parser.add_argument('--split', choices=('off', 'on'), default='off')
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--n-ctx', type=int, default=4096)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--out', default=os.path.join(common.BENCH_DIR, 'results'))
    args = parser.parse_args(argv)
    manifest = models.tiny_manifest() if args.tiny else models.cached_bench_model(args.model)
    threads = args.threads or os.cpu_count() or 1
    results = []
    for path in paths.select([p for p in args.paths.split(',') if p]):
        if path.kind not in ('pipeline', 'mtmd'):
            print(f'skipping {path.name}: only our pipeline paths are profiled',
                  file=sys.stderr)
            continue
        result = profile_path(manifest, path, args.new_tokens, args.split == 'on', threads,
                              args.n_ctx, args.repeat)
        result['model'] = manifest['name']
        results.append(result)
        print(_text([result]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'profile.json'), 'w', encoding='utf-8') as f:
        json.dump({'threads': threads, 'command': 'python -m vlm_ros_bench profile '
                   + ' '.join(argv or sys.argv[1:]), 'results': results}, f, indent=1)
    with open(os.path.join(args.out, 'profile.txt'), 'w', encoding='utf-8') as f:
        f.write(_text(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
