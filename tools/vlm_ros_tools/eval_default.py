"""
Measure the embedded default model on held-out scenes, through ``vlm_ros.pipeline``.

``python -m vlm_ros_tools.eval_default`` asks every question kind about each of 200 scenes
of seed 1 (training used seed 0) with greedy decoding on the four shipped runtime paths --
ONNX fp32, ONNX int8, and the llama.cpp language model in f16 and Q8_0 (ONNX fp32 vision
encoder) -- and prints a markdown table of exact-match accuracy per kind and overall, plus
how often each path gives the fp32 answer.
"""

import argparse
import os
import time

from . import scenes

# Runtime paths: name -> keyword arguments of vlm_ros.pipeline.
PATHS = {
    'ONNX fp32': {},
    'ONNX int8': {'variant': 'int8'},
    'llama.cpp f16': {'decoder_model': 'gguf/model-f16.gguf'},
    'llama.cpp Q8_0': {'decoder_model': 'gguf/model-q8_0.gguf'},
}
DEFAULT_MODEL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'vlm_ros', 'models', 'default')
MAX_NEW_TOKENS = 48


def load(model_dir, path, n_threads=1):
    """Return a greedy ``vlm_ros.pipeline`` of ``model_dir`` on runtime ``path``."""
    import vlm_ros

    return vlm_ros.pipeline(model_dir, n_threads=n_threads, max_new_tokens=MAX_NEW_TOKENS,
                            **PATHS[path])


def answer(pipe, items):
    """Return the answers of ``pipe`` to every question of ``items`` (held_out_set rows)."""
    out = []
    for image, _, qas in items:
        out.append([pipe.generate(image, qa.question).text for qa in qas])
    return out


def score(items, answers):
    """Return ``{kind: (correct, total)}`` plus ``'overall'``."""
    counts = {k: [0, 0] for k in scenes.KINDS}
    for (_, _, qas), row in zip(items, answers, strict=True):
        for qa, text in zip(qas, row, strict=True):
            counts[qa.kind][0] += scenes.is_correct(text, qa.answer)
            counts[qa.kind][1] += 1
    counts = {k: tuple(v) for k, v in counts.items() if v[1]}
    counts['overall'] = (sum(c for c, _ in counts.values()), sum(t for _, t in counts.values()))
    return counts


def agreement(answers, reference):
    """Return the fraction of answers equal (normalised) to the reference answers."""
    pairs = [(a, b) for row, ref in zip(answers, reference, strict=True)
             for a, b in zip(row, ref, strict=True)]
    return sum(scenes.normalise(a) == scenes.normalise(b) for a, b in pairs) / len(pairs)


def evaluate(model_dir=DEFAULT_MODEL_DIR, seed=1, num_scenes=200, paths=tuple(PATHS),
             size=scenes.DEFAULT_SIZE, n_threads=1):
    """Return ``{path: {'scores', 'answers', 'agreement', 'seconds'}}`` and the items."""
    items = scenes.held_out_set(seed, num_scenes, size)
    results = {}
    reference = None
    for path in paths:
        pipe = load(model_dir, path, n_threads)
        start = time.monotonic()
        answers = answer(pipe, items)
        seconds = time.monotonic() - start
        pipe.close()
        if reference is None:
            reference = answers
        results[path] = {'scores': score(items, answers), 'answers': answers,
                         'agreement': agreement(answers, reference), 'seconds': seconds}
    return results, items


def markdown_table(results):
    """Return the accuracy table (rows: kinds and overall; columns: runtime paths)."""
    paths = list(results)
    kinds = list(next(iter(results.values()))['scores'])
    lines = ['| question kind | ' + ' | '.join(paths) + ' |',
             '| --- |' + ' ---: |' * len(paths)]
    for kind in kinds:
        total = results[paths[0]]['scores'][kind][1]
        cells = [f'{100.0 * results[p]["scores"][kind][0] / total:.1f}%' for p in paths]
        name = f'**{kind}**' if kind == 'overall' else kind
        lines.append(f'| {name} (n={total}) | ' + ' | '.join(cells) + ' |')
    cells = [f'{100.0 * results[p]["agreement"]:.1f}%' for p in paths]
    lines.append(f'| same answer as {paths[0]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    """Command line: print the accuracy table of the default model (or another folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--model-dir', default=DEFAULT_MODEL_DIR)
    parser.add_argument('--seed', type=int, default=1, help='held-out seed (training: 0)')
    parser.add_argument('--scenes', type=int, default=200, help='scenes (x6 questions)')
    parser.add_argument('--size', type=int, default=scenes.DEFAULT_SIZE, help='image side')
    parser.add_argument('--paths', nargs='+', choices=list(PATHS), default=list(PATHS))
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--errors', type=int, default=0, metavar='N',
                        help='also list the first N wrong answers of each path')
    args = parser.parse_args(argv)
    results, items = evaluate(args.model_dir, args.seed, args.scenes, tuple(args.paths),
                              args.size, args.threads)
    print(markdown_table(results))
    for path, res in results.items():
        print(f'\n{path}: {res["seconds"]:.1f} s for {res["scores"]["overall"][1]} questions')
        shown = 0
        for (_, scene, qas), row in zip(items, res['answers'], strict=True):
            for qa, text in zip(qas, row, strict=True):
                if shown < args.errors and not scenes.is_correct(text, qa.answer):
                    print(f'  [{scenes.describe(scene)}] {qa.question} -> {text.strip()!r} '
                          f'(expected {qa.answer!r})')
                    shown += 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
