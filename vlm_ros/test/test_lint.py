"""Static checks: ament flake8 and pep257 (as on a Humble build farm) and ruff for py310."""

import ast
import pathlib
import shutil
import subprocess
import sys

from ament_pep257.main import main as pep257_main
from conftest import REPO
import pytest

pytestmark = pytest.mark.lint

PACKAGE = pathlib.Path(__file__).resolve().parents[1]
# Everything Python in the repository that a reviewer reads.
PATHS = [str(PACKAGE), str(REPO / 'tools'), str(REPO / 'scripts'), str(REPO / 'benchmarks')]


@pytest.mark.flake8
def test_flake8():
    # In a fresh interpreter: flake8 forks worker processes, and a fork of this one, which
    # earlier tests left holding rclpy handles and DDS threads, can crash in a worker (seen
    # once on Python 3.10: a segfault while collecting garbage, then a pool that never ends).
    paths = [p for p in PATHS if pathlib.Path(p).exists()]
    result = subprocess.run([sys.executable, '-m', 'ament_flake8.main', *paths],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, 'flake8 found errors:\n' + result.stdout + result.stderr


@pytest.mark.pep257
def test_pep257():
    rc = pep257_main(argv=[p for p in PATHS if pathlib.Path(p).exists()])
    assert rc == 0, 'pep257 found errors'


def test_ruff_py310():
    ruff = shutil.which('ruff')
    assert ruff, 'ruff is a test dependency (requirements/dev.txt)'
    result = subprocess.run([ruff, 'check', '--no-cache', str(REPO)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sources_parse_as_python_310():
    """Humble runs Python 3.10: no newer grammar anywhere (a second check beside ruff)."""
    skip = {'.venv', 'build', 'install', 'log', '.cache'}
    for path in REPO.glob('**/*.py'):
        parts = path.relative_to(REPO).parts
        if any(part in skip or part.startswith('.venv') for part in parts):
            continue
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))
