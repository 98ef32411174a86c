"""
Measure the embedded default model on held-out scenes, through ``vlm_ros.pipeline``.

``python -m vlm_ros_tools.eval_default`` asks every question kind about each of 200 scenes
of seed 1 (training used seed 0) with greedy decoding on the four shipped runtime paths --
ONNX fp32, ONNX int8, and the llama.cpp language model in f16 and Q8_0 (ONNX fp32 vision
encoder) -- and prints a markdown table of accuracy per kind and overall, plus how often each
path gives the fp32 answer.  ``--set drawn`` asks about scenes of ``drawn_scenes`` instead,
drawn by a renderer the model never trained on.

Answers are scored by exact match, except grounding (``detect``) questions that expect a box:
one is right when a box the pipeline read from the answer overlaps the true box with an IoU
of at least 0.5; the table also gives the mean of the best IoU per question (0 without a box).
"""

import argparse
import os
import time

from . import drawn_scenes, scenes

# Runtime paths: name -> keyword arguments of vlm_ros.pipeline.
PATHS = {
    'ONNX fp32': {},
    'ONNX int8': {'variant': 'int8'},
    'llama.cpp f16': {'decoder_model': 'gguf/model-f16.gguf'},
    'llama.cpp Q8_0': {'decoder_model': 'gguf/model-q8_0.gguf'},
    # llama.cpp's own projector: libmtmd preprocesses and lays the image out.
    'llama.cpp f16 + mtmd': {'vision_model': 'gguf/mmproj-f16.gguf',
                             'decoder_model': 'gguf/model-f16.gguf'},
}
DEFAULT_MODEL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'vlm_ros', 'models', 'default')
MAX_NEW_TOKENS = 48
SETS = ('held_out', 'drawn')
DETECT = 'detect'
MIN_IOU = 0.5


def load(model_dir, path, n_threads=1):
    """Return a greedy ``vlm_ros.pipeline`` of ``model_dir`` on runtime ``path``."""
    import vlm_ros

    return vlm_ros.pipeline(model_dir, n_threads=n_threads, max_new_tokens=MAX_NEW_TOKENS,
                            **PATHS[path])


def scene_set(name, seed, num_scenes, size=scenes.DEFAULT_SIZE):
    """Return ``[(image, scene, [QA per kind])]`` of set ``name`` (``size``: held_out only)."""
    if name == 'drawn':
        return drawn_scenes.drawn_set(seed, num_scenes)
    if name != 'held_out':
        raise ValueError(f'unknown scene set {name!r}, expected one of {SETS}')
    return scenes.held_out_set(seed, num_scenes, size)


def answer(pipe, items):
    """Return the results (text and detections) of ``pipe`` to every question of ``items``."""
    return [[pipe.generate(image, qa.question) for qa in qas] for image, _, qas in items]


def iou(a, b):
    """Return the intersection over union of boxes ``a`` and ``b`` (x1, y1, x2, y2)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def judge(image, qa, result):
    """
    Return (correct, IoU) of one answer; the IoU is None unless ``qa`` expects a box.

    A box is right when one of ``result.detections`` (pixels of ``image``) overlaps the true
    one (``qa.box``, fractions of the image) with an IoU of at least ``MIN_IOU``.
    """
    if qa.kind != DETECT or qa.box is None:
        return scenes.is_correct(result.text, qa.answer), None
    height, width = image.shape[:2]
    truth = (qa.box[0] * width, qa.box[1] * height, qa.box[2] * width, qa.box[3] * height)
    best = max((iou((b.x1, b.y1, b.x2, b.y2), truth) for b in result.detections),
               default=0.0)
    return best >= MIN_IOU, best


def judge_all(items, results):
    """Return ``judge`` of every answer, in rows like ``results``."""
    return [[judge(image, qa, result) for qa, result in zip(qas, row, strict=True)]
            for (image, _, qas), row in zip(items, results, strict=True)]


def score(items, verdicts):
    """Return ``{kind: (correct, total)}`` plus ``'overall'``, from ``judge_all`` rows."""
    counts = {k: [0, 0] for k in scenes.KINDS}
    for (_, _, qas), row in zip(items, verdicts, strict=True):
        for qa, (correct, _) in zip(qas, row, strict=True):
            counts[qa.kind][0] += correct
            counts[qa.kind][1] += 1
    counts = {k: tuple(v) for k, v in counts.items() if v[1]}
    counts['overall'] = (sum(c for c, _ in counts.values()), sum(t for _, t in counts.values()))
    return counts


def mean_iou(verdicts):
    """Return (mean IoU, count) of the answers that were to give a box; None if there were none."""
    ious = [value for row in verdicts for _, value in row if value is not None]
    return (sum(ious) / len(ious), len(ious)) if ious else None


def agreement(answers, reference):
    """Return the fraction of answers equal (normalised) to the reference answers."""
    pairs = [(a, b) for row, ref in zip(answers, reference, strict=True)
             for a, b in zip(row, ref, strict=True)]
    return sum(scenes.normalise(a) == scenes.normalise(b) for a, b in pairs) / len(pairs)


def evaluate(model_dir=DEFAULT_MODEL_DIR, seed=1, num_scenes=200, paths=tuple(PATHS),
             size=scenes.DEFAULT_SIZE, n_threads=1, set_name='held_out'):
    """
    Return ``{path: {...}}`` and the items of scene set ``set_name``.

    Per path: ``scores`` (``score``), ``answers`` (texts), ``results`` (pipeline results),
    ``verdicts`` (``judge_all``), ``mean_iou``, ``agreement`` (with the first path's texts)
    and ``seconds``.
    """
    items = scene_set(set_name, seed, num_scenes, size)
    results = {}
    reference = None
    for path in paths:
        pipe = load(model_dir, path, n_threads)
        start = time.monotonic()
        outputs = answer(pipe, items)
        seconds = time.monotonic() - start
        pipe.close()
        answers = [[r.text for r in row] for row in outputs]
        if reference is None:
            reference = answers
        verdicts = judge_all(items, outputs)
        results[path] = {'scores': score(items, verdicts), 'answers': answers,
                         'results': outputs, 'verdicts': verdicts,
                         'mean_iou': mean_iou(verdicts),
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
        if kind == DETECT and results[paths[0]]['mean_iou']:
            count = results[paths[0]]['mean_iou'][1]
            cells = [f'{results[p]["mean_iou"][0]:.3f}' for p in paths]
            lines.append(f'| detect mean IoU (n={count}) | ' + ' | '.join(cells) + ' |')
    cells = [f'{100.0 * results[p]["agreement"]:.1f}%' for p in paths]
    lines.append(f'| same answer as {paths[0]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def errors(items, res, limit):
    """Return lines describing the first ``limit`` wrong answers of one path's ``res``."""
    lines = []
    rows = zip(items, res['answers'], res['verdicts'], strict=True)
    for (_, scene, qas), texts, verdicts in rows:
        for qa, text, (correct, value) in zip(qas, texts, verdicts, strict=True):
            if len(lines) == limit:
                return lines
            if not correct:
                shapes = ', '.join(f'{i.colour} {i.shape} {i.place}' for i in scene.items)
                overlap = '' if value is None else f', IoU {value:.2f}'
                lines.append(f'  [{shapes}] {qa.question} -> {text.strip()!r} '
                             f'(expected {qa.answer!r}{overlap})')
    return lines


def main(argv=None):
    """Command line: print the accuracy table of the default model (or another folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--model-dir', default=DEFAULT_MODEL_DIR)
    parser.add_argument('--set', choices=SETS, default='held_out',
                        help="scenes: held_out (training's renderer) or drawn (drawn_scenes)")
    parser.add_argument('--seed', type=int, default=1, help='held-out seed (training: 0)')
    parser.add_argument('--scenes', type=int, default=200,
                        help='scenes (one question of each kind about each)')
    parser.add_argument('--size', type=int, default=scenes.DEFAULT_SIZE,
                        help='image side (held_out; drawn scenes have their own)')
    parser.add_argument('--paths', nargs='+', choices=list(PATHS), default=list(PATHS))
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--errors', type=int, default=0, metavar='N',
                        help='also list the first N wrong answers of each path')
    args = parser.parse_args(argv)
    results, items = evaluate(args.model_dir, args.seed, args.scenes, tuple(args.paths),
                              args.size, args.threads, args.set)
    print(markdown_table(results))
    for path, res in results.items():
        print(f'\n{path}: {res["seconds"]:.1f} s for {res["scores"]["overall"][1]} questions')
        for line in errors(items, res, args.errors):
            print(line)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
