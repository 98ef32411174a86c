"""The repository builds as a Humble user would build it: cloned into a workspace's src/."""

import os
import pathlib
import shutil
import subprocess
import sys

from conftest import REPO
import pytest

pytestmark = pytest.mark.slow


def test_colcon_build_in_plain_workspace(tmp_path):
    (tmp_path / 'src').mkdir()
    # A link stands in for the clone; it also brings along this checkout's venv and build
    # trees, which colcon must not take for packages.
    (tmp_path / 'src' / 'vlm_ros').symlink_to(REPO)
    venv = pathlib.Path(sys.prefix)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('COLCON', 'AMENT', 'CMAKE'))}
    env.update(AMENT_PREFIX_PATH=str(venv), CMAKE_PREFIX_PATH=str(venv))
    colcon = shutil.which('colcon')
    listed = subprocess.run([colcon, 'list', '--names-only'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == ['vlm_ros', 'vlm_ros_interfaces']
    built = subprocess.run(
        [colcon, 'build', '--event-handlers', 'console_cohesion-',
         '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    install = tmp_path / 'install'
    assert (install / 'vlm_ros' / 'lib' / 'vlm_ros' / 'vlm_node').is_file()
    generated = list((install / 'vlm_ros_interfaces').glob(
        'lib/python3*/site-packages/vlm_ros_interfaces/srv/_query.py'))
    assert generated, 'the Query service was not generated for Python'
    probe = ('from vlm_ros_interfaces.srv import Query; '
             'print(Query.Request().temperature)')
    shell = f'source {install}/setup.bash && {sys.executable} -c "{probe}"'
    ran = subprocess.run(['bash', '-c', shell], env=env, capture_output=True, text=True)
    assert ran.stdout.strip() == '-1.0', ran.stderr
