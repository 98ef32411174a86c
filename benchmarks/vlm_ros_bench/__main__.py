"""
Command line: ``python -m vlm_ros_bench [run|build|profile] ...`` (``run`` by default).

``run``      measure every path and write JSON, markdown and chart (``make bench``)
``build``    build the real-size benchmark models into the cache
``profile``  cProfile our decode loop at a real model size
``report``   re-render the markdown and chart of a results JSON (e.g. once matplotlib is
             installed)
"""

import argparse
import sys


def main(argv=None):
    """Dispatch to the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ('run', 'build', 'profile', 'report') \
        else 'run'
    if command == 'build':
        from vlm_ros_bench import models
        return models.main(argv)
    if command == 'profile':
        from vlm_ros_bench import profile_decode
        return profile_decode.main(argv)
    if command == 'report':
        from vlm_ros_bench import run
        return run.rerender(argv)
    from vlm_ros_bench import run
    parser = argparse.ArgumentParser(prog='python -m vlm_ros_bench [run]',
                                     description='Benchmark vlm_ros at real model sizes.')
    run.add_arguments(parser)
    args = parser.parse_args(argv)
    doc = run.run(args, ['run'] + argv if argv[:1] != ['run'] else argv)
    failed = [r for r in doc['runs'] if r['status'] != 'ok']
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
