"""
Point the PyPI ROS 2 wheels' CMake exports at this interpreter.

The wheels' exported targets name include directories of the machine that built them
(``/opt/python/cpXY-cpXY/...``); CMake refuses imported targets with missing include paths.
Rewriting them inside the venv touches nothing outside it. Idempotent.
"""

import pathlib
import re
import sys
import sysconfig

import numpy


def main(venv):
    share = pathlib.Path(venv) / 'share'
    py_include = sysconfig.get_paths()['include']
    np_include = numpy.get_include()
    patterns = [
        (re.compile(r'/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/'
                    r'(?:_core|core)/include'), np_include),
        (re.compile(r'/opt/python/cp3\d+-cp3\d+/include/python3\.\d+'), py_include),
    ]
    changed = 0
    for path in share.glob('*/cmake/*.cmake'):
        text = path.read_text()
        new = text
        for pattern, repl in patterns:
            new = pattern.sub(repl, new)
        if new != text:
            path.write_text(new)
            changed += 1
    print(f'fix_ros_wheels: {changed} CMake files repointed to {py_include} and {np_include}')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix)
