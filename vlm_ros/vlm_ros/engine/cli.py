"""``vlm_ask``: answer one image and prompt from the shell, without ROS."""

import argparse
import json
import os
import sys

from vlm_ros.engine import images
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.model_files import ONNX_VARIANTS


def build_parser():
    """Command-line options: model, input and generation settings."""
    p = argparse.ArgumentParser(prog='vlm_ask', description=__doc__.split('\n')[0].strip('`'))
    p.add_argument('model_dir', help='model folder as laid out in its hub repository')
    p.add_argument('images', nargs='*', metavar='image',
                   help='image files, asked about together (none: a text-only prompt)')
    p.add_argument('-p', '--prompt', default='Describe this image.')
    p.add_argument('--system', default='', help='system prompt')
    p.add_argument('--variant', default='fp32', choices=ONNX_VARIANTS,
                   help='ONNX precision variant of the graphs')
    p.add_argument('--vision-model', help='vision encoder file (relative to model_dir)')
    p.add_argument('--decoder-model', help='decoder file (relative to model_dir)')
    p.add_argument('--threads', type=int, default=0, help='0 = all cores')
    p.add_argument('--split', dest='split', action='store_true', default=None,
                   help='split large images into tiles')
    p.add_argument('--no-split', dest='split', action='store_false')
    p.add_argument('--max-tiles', type=int, default=0)
    p.add_argument('--max-new-tokens', type=int, default=256)
    p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
    p.add_argument('--top-k', type=int, default=0)
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--repetition-penalty', type=float, default=1.0)
    p.add_argument('--seed', type=int)
    p.add_argument('--beams', type=int, default=1)
    p.add_argument('--stop', action='append', default=[], help='stop string (repeatable)')
    p.add_argument('--stream', action='store_true', help='print text as it is generated')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.add_argument('--detect', action='append', default=[], metavar='LABEL',
                   help="locate LABEL (repeatable) with the model family's grounding "
                        'question instead of asking --prompt; prints one box per line')
    p.add_argument('--annotate', metavar='PATH',
                   help='write the first image with the boxes of the answer drawn to PATH')
    return p


def _detect(pipe, rgbs, args, kwargs):
    """Ask the family's grounding question per label; return the merged Result."""
    from vlm_ros.engine import grounding

    template = grounding.family_template(pipe.family.info)
    return grounding.detect(pipe, rgbs, grounding.prompts(template, args.detect),
                            args.system, **kwargs)


def _image_format(path):
    """Return the Pillow format ``path``'s extension names, or None."""
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def _write_annotated(path, rgb, boxes):
    """Write ``rgb`` with ``boxes`` drawn to ``path``."""
    from PIL import Image

    from vlm_ros.engine import annotate

    try:
        Image.fromarray(annotate.draw_boxes(rgb, boxes)).save(path, _image_format(path))
    except (OSError, ValueError) as exc:
        raise VlmError(f'cannot write {path}: {exc}') from exc


def main(argv=None):
    """Run one request; exit 1 with the error on stderr when it fails."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.detect or args.annotate) and not args.images:
        parser.error('--detect and --annotate need an image')
    if args.annotate and _image_format(args.annotate) is None:
        parser.error(f'--annotate {args.annotate}: give a file name with an image extension '
                     '(.png, .jpg, ...)')
    from vlm_ros.engine.loader import pipeline
    try:
        pipe = pipeline(args.model_dir, vision_model=args.vision_model,
                        decoder_model=args.decoder_model, variant=args.variant,
                        n_threads=args.threads,
                        image_options=ImageOptions(args.split, args.max_tiles))
        on_text = (lambda s: print(s, end='', flush=True)) if args.stream else None
        kwargs = {'on_text': on_text, 'max_new_tokens': args.max_new_tokens,
                  'temperature': args.temperature, 'top_k': args.top_k, 'top_p': args.top_p,
                  'repetition_penalty': args.repetition_penalty, 'seed': args.seed,
                  'num_beams': args.beams, 'stop': tuple(args.stop)}
        # Decoded once: the annotated image is the first one as the model got it.
        rgbs = [images.to_rgb(path) for path in args.images]
        if args.detect:
            result = _detect(pipe, rgbs, args, kwargs)
        else:
            result = pipe.generate(rgbs, args.prompt, args.system, **kwargs)
        if args.annotate:
            _write_annotated(args.annotate, rgbs[0], result.detections)
    except VlmError as exc:
        print(f'vlm_ask: {exc}', file=sys.stderr)
        return 1
    if args.detect and not args.json:
        if args.stream:
            print()
        for b in result.detections:
            print(f'{b.label}: x1 {b.x1:.0f} y1 {b.y1:.0f} x2 {b.x2:.0f} y2 {b.y2:.0f}')
        if not result.detections:
            print('nothing found')
        return 0
    if args.json:
        t = result.timings
        print(json.dumps({
            'text': result.text, 'finish_reason': result.finish_reason,
            'prompt_tokens': result.prompt_tokens, 'image_tokens': result.image_tokens,
            'completion_tokens': result.completion_tokens, 'token_ids': result.token_ids,
            'timings_ms': {'preprocess': t.preprocess_ms, 'vision': t.vision_ms,
                           'prefill': t.prefill_ms, 'decode': t.decode_ms,
                           'total': t.total_ms},
            'detections': [{'label': b.label, 'score': b.score, 'box': [b.x1, b.y1, b.x2, b.y2]}
                           for b in result.detections]}))
    elif args.stream:
        print()
    else:
        print(result.text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
