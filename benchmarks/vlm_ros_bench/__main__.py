"""
Command line: ``python -m vlm_ros_bench [COMMAND] ...`` (``run`` by default).

``run``      measure every path on SmolVLM2 and write JSON, markdown and chart
             (``latest.*``); with ``--qwen2vl`` the Qwen2-VL run follows (``make bench``)
``qwen2vl``  measure Qwen2-VL at 2B shapes on its paths (``qwen2vl.json`` / ``.md``)
``build``    build the real-size benchmark models into the cache
``profile``  cProfile our decode loop at a real model size
``report``   re-render the markdown and chart of a results JSON (e.g. once matplotlib is
             installed)
"""

import argparse
import sys

COMMANDS = ('run', 'qwen2vl', 'build', 'profile', 'report')


def main(argv=None):
    """Dispatch to the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else 'run'
    if command == 'build':
        from vlm_ros_bench import models
        return models.main(argv)
    if command == 'profile':
        from vlm_ros_bench import profile_decode
        return profile_decode.main(argv)
    if command == 'report':
        from vlm_ros_bench import run
        return run.rerender(argv)
    if command == 'qwen2vl':
        from vlm_ros_bench import qwen2vl
        return qwen2vl.main(argv)
    from vlm_ros_bench import run
    parser = argparse.ArgumentParser(prog='python -m vlm_ros_bench [run]',
                                     description='Benchmark vlm_ros at real model sizes.')
    run.add_arguments(parser)
    parser.add_argument('--qwen2vl', action=argparse.BooleanOptionalAction, default=False,
                        help='then run the Qwen2-VL benchmark with its defaults (its '
                             '--out, --threads, --tiny and --rebuild follow these)')
    args = parser.parse_args(argv)
    doc = run.run(args, ['run'] + argv if argv[:1] != ['run'] else argv)
    failed = [r for r in doc['runs'] if r['status'] != 'ok']
    status = 1 if failed else 0
    if args.qwen2vl:
        from vlm_ros_bench import qwen2vl
        status = max(status, qwen2vl.main(qwen2vl_arguments(args)))
    return status


def qwen2vl_arguments(args):
    """Return the ``qwen2vl`` arguments that follow a ``run``'s parsed ``args``."""
    out = ['--out', args.out]
    if args.threads:
        out += ['--threads', str(args.threads)]
    out += ['--tiny'] * bool(args.tiny) + ['--rebuild'] * bool(args.rebuild)
    return out


if __name__ == '__main__':
    sys.exit(main())
