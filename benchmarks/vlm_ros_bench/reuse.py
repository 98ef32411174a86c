"""
What the caches save: time to first token of follow-up questions and conversation turns.

One pipeline with its caches on (``feature_cache_mb`` 64, ``kv_cache_slots`` 2) per path, in
its own process (``python -m vlm_ros_bench.reuse SPEC OUT``). Each repetition uses images it
has not seen before (the benchmark image with a little seeded noise, same size):

- the first question about an image (nothing reusable but the text before the image);
- a different question about the same image (features from the cache, the prompt up to
  the question from the KV cache);
- the first question about a new image of the same size (nothing may be reused: it checks
  that a different image never hits);
- a conversation of four turns about one image, each turn's history carrying the earlier
  questions and scripted answers (as a caller feeds the answers back), the image shown in
  turn 1: the prompt tokens each turn prefills are reported beside its length.

Time to first token = preprocess + vision + prefill of the engine's own timings.
"""

import time

from vlm_ros_bench import common

QUESTIONS = ('Describe this image.', 'What colour is the largest object?',
             'Is there a person in the picture?', 'Where is the door?')
ANSWERS = ('A kitchen with a table, two chairs and a window.', 'The table is brown.',
           'No, there is nobody in the picture.')


def _image(seed):
    import numpy as np

    base = common.bench_image().astype(np.int16)
    noise = np.random.default_rng(1000 + seed).integers(-6, 7, base.shape, dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _ttft(result):
    t = result.timings
    return t.preprocess_ms + t.vision_ms + t.prefill_ms


def measure(model_dir, files, path_name, threads, n_ctx, reps, new_tokens):
    """Return the reuse figures of one path."""
    import vlm_ros
    from vlm_ros.engine.datatypes import ImageOptions

    kwargs = {'n_threads': threads, 'feature_cache_mb': 64, 'kv_cache_slots': 2}
    if str(files.get('decoder_model', '')).endswith('.gguf'):
        kwargs['n_ctx'] = n_ctx
    if 'variant' in files:
        kwargs['variant'] = files.pop('variant')
    pipe = vlm_ros.pipeline(model_dir, **files, **kwargs)
    options = ImageOptions(do_image_splitting=False)

    def ask(image, question, history=()):
        return pipe.generate(image, question, history=list(history), image_options=options,
                             max_new_tokens=new_tokens, ignore_eos=True)

    ask(_image(-1), QUESTIONS[0])  # warm-up
    first, follow, new_image, per_turn = [], [], [], [[] for _ in QUESTIONS]
    cached = {'follow_up': [], 'new_image': []}
    for rep in range(reps):
        frame = _image(3 * rep)
        first.append(_ttft(ask(frame, QUESTIONS[0])))
        r = ask(frame, QUESTIONS[1])
        follow.append(_ttft(r))
        cached['follow_up'].append(r.cached_tokens)
        r = ask(_image(3 * rep + 1), QUESTIONS[0])
        new_image.append(_ttft(r))
        cached['new_image'].append(r.cached_tokens)
        talk = _image(3 * rep + 2)
        history = []
        for turn, question in enumerate(QUESTIONS):
            r = ask(talk if turn == 0 else None, question, history)
            per_turn[turn].append({'ttft_ms': _ttft(r), 'prompt_tokens': r.prompt_tokens,
                                   'prefilled_tokens': r.prompt_tokens - r.cached_tokens})
            if turn < len(ANSWERS):
                history += [{'text': question, 'images': [talk]} if turn == 0 else question,
                            ANSWERS[turn]]
    first_s, follow_s = common.summarize(first), common.summarize(follow)
    return {
        'path': path_name, 'status': 'ok', 'error': None, 'repetitions': reps,
        'first_ttft_ms': first_s, 'follow_up_ttft_ms': follow_s,
        'new_image_ttft_ms': common.summarize(new_image),
        'follow_up_fraction': follow_s['median'] / first_s['median'],
        'follow_up_cached_tokens': common.summarize(cached['follow_up']),
        'new_image_cached_tokens': common.summarize(cached['new_image']),
        'turns': [{'turn': i + 1,
                   'prompt_tokens': runs[-1]['prompt_tokens'],
                   'prefilled_tokens': common.summarize([x['prefilled_tokens'] for x in runs]),
                   'ttft_ms': common.summarize([x['ttft_ms'] for x in runs])}
                  for i, runs in enumerate(per_turn)],
    }


def _measure_spec(spec):
    start = time.perf_counter()
    out = measure(spec['model_dir'], dict(spec['files']), spec['path'], spec['threads'],
                  spec['n_ctx'], spec['reps'], spec['new_tokens'])
    out['seconds'] = time.perf_counter() - start
    return out


def main(argv=None):
    """Measure one path's reuse in this process: SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.reuse', _measure_spec)


if __name__ == '__main__':
    raise SystemExit(main())
