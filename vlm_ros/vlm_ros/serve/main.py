"""``vlm_serve``: serve one model over an OpenAI-compatible HTTP API, without ROS."""

import argparse
import logging
import os
import sys

from vlm_ros.engine.datatypes import GenerationConfig, ImageOptions
from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.families import registry
from vlm_ros.engine.model_files import ONNX_VARIANTS
from vlm_ros.serve import settings
from vlm_ros.serve.image_sources import ImagePolicy, MIB

_LOG = logging.getLogger('vlm_ros.serve')
EXIT_USAGE = 2
EXIT_LOAD = 1


def build_parser():
    """Command-line options: the model (like vlm_ask, or a node parameters file), the server."""
    p = argparse.ArgumentParser(
        prog='vlm_serve', description='Serve one model over an OpenAI-compatible HTTP API.',
        epilog='With no model named, the embedded default (demo) model is served.')
    m = p.add_argument_group('model')
    m.add_argument('model_dir', nargs='?',
                   help='model folder as laid out in its hub repository')
    m.add_argument('--params-file', metavar='YAML',
                   help='a vlm_node parameters file (config/*.yaml): its model, backend, '
                   'generation defaults, threads and queue size; options given here win')
    m.add_argument('--vision-model', help='vision encoder file (relative to model_dir)')
    m.add_argument('--decoder-model', help='decoder file (relative to model_dir)')
    m.add_argument('--variant', choices=ONNX_VARIANTS,
                   help='ONNX precision variant of the graphs (default fp32)')
    keys = ', '.join(i.key for i in registry.infos())
    m.add_argument('--model-type', help=f"model family: a key ({keys}) or the node's "
                   f'model_type value ({registry.param_help()}); default: the files decide')
    m.add_argument('--threads', type=int, help='runtime threads; 0 = all cores (default)')
    m.add_argument('--n-ctx', type=int, help="llama.cpp context; 0 = the model's (default)")
    m.add_argument('--n-gpu-layers', type=int,
                   help='llama.cpp layers offloaded to the GPU of a CUDA / Metal build; '
                   '0 = CPU only (default), -1 = all')
    m.add_argument('--onnx-providers', type=lambda text: [p for p in text.split(',') if p],
                   help='ONNX Runtime execution providers in order, comma-separated (e.g. '
                   'CUDAExecutionProvider,CPUExecutionProvider); default CPU')
    m.add_argument('--split', dest='split', action='store_true', default=None,
                   help='split large images into tiles')
    m.add_argument('--no-split', dest='split', action='store_false')
    m.add_argument('--max-tiles', type=int, help="cap on tiles; 0 = the model's own")
    m.add_argument('--max-tokens', type=int,
                   help='answer length for requests that set no max_tokens (default 256)')
    m.add_argument('--system-prompt',
                   help='system prompt for requests without a system message')
    s = p.add_argument_group('server')
    s.add_argument('--host', default='127.0.0.1',
                   help='address to listen on (default 127.0.0.1: this machine only)')
    s.add_argument('--port', type=int, default=8000, help='default 8000')
    s.add_argument('--api-key-env', metavar='NAME',
                   help='name of the environment variable holding the API key clients must '
                   'send (Authorization: Bearer); none: no authentication')
    s.add_argument('--queue-size', type=int,
                   help='requests held at once, the running one included; more get HTTP '
                   '429 (default 4)')
    s.add_argument('--max-concurrent', type=int,
                   help='requests a llama.cpp decoder answers at once, their decode steps '
                   'batched (default 1; an ONNX decoder or a remote server: one at a time)')
    s.add_argument('--served-model-name', help='model name clients use (default: the model '
                   'folder name)')
    s.add_argument('--max-body-mb', type=float, default=20.0,
                   help='largest request body, images included (default 20)')
    s.add_argument('--allow-image-urls', action='store_true',
                   help='fetch http(s):// image URLs (off: only data: URLs are accepted)')
    s.add_argument('--image-dir', metavar='DIR',
                   help='accept file:// image URLs for files inside DIR (off by default)')
    s.add_argument('--image-fetch-timeout', type=float, default=10.0, metavar='S',
                   help='longest fetch of one http(s) image, in seconds (default 10)')
    s.add_argument('--log-level', default='info',
                   choices=('critical', 'error', 'warning', 'info', 'debug'))
    return p


class UsageError(ValueError):
    """An option or parameter that cannot be used as given."""


def family_key(value):
    """Return the family key for ``--model-type``: a key or the node's integer value."""
    if value is None:
        return None
    text = str(value).strip()
    cls = registry.by_param(int(text)) if text.lstrip('-').isdigit() else registry.by_key(text)
    return cls.info.key


def _pick(cli, params, name, fallback=None):
    """Return the command-line value, else the parameters file's, else ``fallback``."""
    if cli is not None:
        return cli
    if params is not None:
        return params[name]
    return fallback


def resolve_model(args, params):
    """Return the ModelSpec the options (and parameters file) name."""
    from vlm_ros.engine.model_spec import resolve, resolve_remote
    if args.params_file and params['backend'] not in ('local', 'remote'):
        raise UsageError(f"{args.params_file}: backend must be 'local' or 'remote', got "
                         f"{params['backend']!r}")
    if params is not None and params['backend'] == 'remote' and \
            not (args.model_dir or args.vision_model or args.decoder_model):
        return resolve_remote(
            params['remote_url'], params['remote_model'], params['remote_api_key_env'],
            connect_timeout_s=params['remote_connect_timeout_s'],
            read_timeout_s=params['remote_read_timeout_s'],
            max_retries=params['remote_max_retries'],
            image_max_side=params['remote_image_max_side'])
    model_dir = os.path.abspath(args.model_dir) if args.model_dir else \
        (params['model_dir'] if params else '') or None
    vision = args.vision_model or (params['model_file_name'] if params else '') or None
    decoder = args.decoder_model or (params['llm_model_name'] if params else '') or None
    if model_dir is None:
        # Files named on the command line without a folder are relative to the working
        # directory, as for vlm_ask; those of a parameters file resolve as the node resolves
        # them (against the package's share folder).
        vision = os.path.abspath(args.vision_model) if args.vision_model else vision
        decoder = os.path.abspath(args.decoder_model) if args.decoder_model else decoder
    model_type = family_key(args.model_type if args.model_type is not None
                            else (params['model_type'] if params else None))
    return resolve(model_dir, vision_model=vision, decoder_model=decoder,
                   variant=args.variant or 'fp32', model_type=model_type,
                   base_dir=settings.share_dir() if params else None,
                   default_dir=settings.default_model_dir())


def generation_defaults(args, params) -> GenerationConfig:
    """Return the settings requests start from: the parameters file's, then --max-tokens."""
    config = GenerationConfig()
    if params is not None:
        config = config.replace(
            max_new_tokens=params['max_new_tokens'], temperature=params['temperature'],
            top_k=params['top_k'], top_p=params['top_p'],
            repetition_penalty=params['repetition_penalty'], num_beams=params['num_beams'],
            seed=params['seed'] if params['seed'] >= 0 else None)
    return config.replace(max_new_tokens=args.max_tokens).validate()


def served_name(args, spec):
    """Return the model name clients must send: the option, else the folder's name."""
    if args.served_model_name:
        return args.served_model_name
    if spec.is_remote:
        return spec.remote.model
    return spec.model_dir.name if spec.model_dir is not None else spec.decoder.stem


def server_options(args, params):
    """Return (api key or None, queue size, max_concurrent, image policy), checked."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, '')
        if not api_key.strip():
            raise UsageError(f'--api-key-env names {args.api_key_env}, which is not set (or '
                             'empty) in the environment')
    queue_size = _pick(args.queue_size, params, 'queue_size', 4)
    if queue_size < 1:
        raise UsageError(f'--queue-size must be at least 1, got {queue_size}')
    max_concurrent = _pick(args.max_concurrent, params, 'max_concurrent', 1)
    if max_concurrent < 1:
        raise UsageError(f'--max-concurrent must be at least 1, got {max_concurrent}')
    if args.max_body_mb <= 0 or args.image_fetch_timeout <= 0:
        raise UsageError('--max-body-mb and --image-fetch-timeout must be positive')
    image_dir = None
    if args.image_dir:
        image_dir = os.path.realpath(args.image_dir)
        if not os.path.isdir(image_dir):
            raise UsageError(f'--image-dir {args.image_dir} is not a folder')
    policy = ImagePolicy(allow_http=args.allow_image_urls, image_dir=image_dir,
                         max_bytes=int(args.max_body_mb * MIB),
                         fetch_timeout_s=args.image_fetch_timeout)
    return api_key, queue_size, max_concurrent, policy


def main(argv=None):
    """
    Load the model, then serve until SIGINT or SIGTERM (exit 0).

    Exit 2 for options or a parameters file that cannot be used, 1 for a model that does
    not load.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format='%(levelname)s:     %(name)s: %(message)s')
    from vlm_ros.engine.loader import build
    try:
        params = settings.read_params_file(args.params_file) if args.params_file else None
        api_key, queue_size, max_concurrent, policy = server_options(args, params)
        defaults = generation_defaults(args, params)
        spec = resolve_model(args, params)
    except (UsageError, settings.ParamsFileError, VlmError) as exc:
        print(f'vlm_serve: {exc}', file=sys.stderr)
        return EXIT_USAGE
    split = args.split if args.split is not None else \
        (params['do_image_splitting'] if params else None)
    try:
        answerer = build(spec, n_threads=_pick(args.threads, params, 'n_threads', 0),
                         n_ctx=_pick(args.n_ctx, params, 'n_ctx', 0), defaults=defaults,
                         n_gpu_layers=_pick(args.n_gpu_layers, params, 'n_gpu_layers', 0),
                         max_concurrent=max_concurrent,
                         providers=_pick(args.onnx_providers, params, 'onnx_providers',
                                         None),
                         image_options=ImageOptions(
                             split, _pick(args.max_tiles, params, 'max_image_tiles', 0)))
    except (VlmError, OSError, ValueError) as exc:
        print(f'vlm_serve: cannot load the model: {exc}', file=sys.stderr)
        return EXIT_LOAD
    from vlm_ros.serve.app import ServeConfig
    config = ServeConfig(
        model_name=served_name(args, spec), api_key=api_key,
        max_body_bytes=int(args.max_body_mb * MIB), images=policy,
        system_prompt=_pick(args.system_prompt, params, 'system_prompt', ''))
    _LOG.info('serving %r: %s', config.model_name, spec.describe())
    if spec.label:
        _LOG.warning('the loaded model is %s', spec.label)
    from vlm_ros.serve.server import run
    try:
        run(answerer, config, queue_size, args.host, args.port, args.log_level)
    finally:
        answerer.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
