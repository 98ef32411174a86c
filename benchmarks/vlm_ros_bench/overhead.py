"""
Our per-token cost over raw llama.cpp, measured in pairs on the same GGUF in one process.

Separate processes, measured minutes apart, disagree by more than the effect: the same commit
gave +11% / +30% (Q8_0 / Q4_0) in one run and +5% / +2% in another. Here the pipeline (int8
vision encoder + the GGUF) and llama.cpp's own loop (``worker.RawLlamaRunner``: llama_decode
and its greedy sampler, nothing of ours per token) load the same file in one process and
take turns, repetition by repetition, swapping who goes first each time. Drift of the
machine then hits both sides of a pair alike. The overhead of a pair is ours / raw - 1 (time
per token). The section reports the median of the pairs and their spread (quartiles): an
effect smaller than that spread is not measured.

Runs in its own process (``python -m vlm_ros_bench.overhead SPEC OUT``).
"""

import os
import sys

from vlm_ros_bench import common, paths, worker

GGUF_TYPES = ('q8_0', 'q4_0')


def measure(spec):
    """Measure every (GGUF type, split) of ``spec``; return the section."""
    image = common.bench_image(spec['image_size'])
    cases = []
    for gguf_type in spec['gguf_types']:
        for split in spec['splits']:
            cases.append(_case(spec, image, gguf_type, split))
    return {'status': 'ok', 'error': None, 'model': spec['model_name'],
            'threads': spec['threads'], 'repetitions': spec['reps'],
            'new_tokens': spec['new_tokens'], 'cases': cases, 'method': METHOD}


METHOD = ('pipeline (int8 vision + the GGUF) and raw llama.cpp (llama_decode + its greedy '
          'sampler) on the same file in one process, alternating repetition by repetition '
          '(who goes first swaps each time); overhead of a pair = pipeline TPOT / raw TPOT - 1')


def _case(spec, image, gguf_type, split):
    ours_path = paths.BY_NAME[f'onnx-int8-vision+llamacpp-{gguf_type}']
    raw_path = paths.BY_NAME[f'llamacpp-raw-{gguf_type}']
    out = {'gguf_type': gguf_type, 'split': split, 'status': 'ok', 'error': None,
           'pipeline_tpot_ms': None, 'raw_tpot_ms': None, 'overhead_fraction': None}
    try:
        sides = []
        for path in (ours_path, raw_path):
            side_spec = dict(spec, path=path.describe())
            runner = worker.RUNNERS[path.kind](side_spec)
            case = {'split': split, 'files': paths.case_files(path, spec['manifest'], split),
                    'prompt_tokens': spec['prompt_tokens'][str(split)]}
            runner.prepare(case)
            runner.run(case, image)  # warm-up
            sides.append((runner, case))
        ours, raw, ratios = [], [], []
        for rep in range(spec['reps']):
            order = (0, 1) if rep % 2 == 0 else (1, 0)
            tpot = {}
            for side in order:
                runner, case = sides[side]
                tpot[side] = runner.run(case, image)['tpot_ms']
            ours.append(tpot[0])
            raw.append(tpot[1])
            ratios.append(tpot[0] / tpot[1] - 1.0)
            print(f'[overhead] {gguf_type} split={split} pair {rep + 1}: ours {tpot[0]:.2f} '
                  f'raw {tpot[1]:.2f} ms/token', file=sys.stderr, flush=True)
        out['pipeline_tpot_ms'] = common.summarize(ours)
        out['raw_tpot_ms'] = common.summarize(raw)
        out['overhead_fraction'] = common.summarize(ratios)
    except Exception as exc:  # noqa: B902 -- reported per case, the others still run
        out['status'] = 'error'
        out['error'] = f'{type(exc).__name__}: {exc}'
    return out


def measure_in_child(manifest, settings, prompt_tokens, reps, workdir):
    """Measure in a fresh process; return the section (an error section if it fails)."""
    spec = {'model_name': manifest['name'], 'model_dir': manifest['model_dir'],
            'manifest': manifest, 'threads': settings['threads'], 'n_ctx': settings['n_ctx'],
            'new_tokens': settings['new_tokens'], 'prompt': settings['prompt'],
            'image_size': common.IMAGE_SIZE, 'reps': reps, 'gguf_types': list(GGUF_TYPES),
            'splits': settings['splits'],
            'prompt_tokens': {str(k): v for k, v in prompt_tokens.items()}}
    stem = os.path.join(workdir, 'overhead')
    result, failure = common.run_child('vlm_ros_bench.overhead', spec, stem,
                                       common.child_env(settings['threads']),
                                       600 + 30 * reps * len(GGUF_TYPES), 'overhead process')
    return result if result is not None else skipped(failure, manifest['name'], 'error')


def skipped(why, model=None, status='skipped'):
    """Return the section of a run that did not measure the paired overhead."""
    return {'status': status, 'error': why, 'model': model, 'threads': 0, 'repetitions': 0,
            'new_tokens': 0, 'cases': [], 'method': METHOD}


def main(argv=None):
    """Measure in this process: SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.overhead', measure)


if __name__ == '__main__':
    raise SystemExit(main())
