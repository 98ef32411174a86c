#!/usr/bin/env bash
# Create the venv with a real ROS 2 from PyPI wheels, colcon and every dependency, then patch
# the wheels' CMake exports so colcon can build interface packages. Idempotent and quick when
# nothing changed: pip runs only when a requirements file (or the distro) changed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "Python 3.10+ required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

reqs=(requirements/runtime.txt requirements/dev.txt "requirements/ros-$ROS_DISTRO.txt")
want="$(cat "${reqs[@]}" scripts/setup.sh scripts/fix_ros_wheels.py | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.vlm_ros_setup"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip wheel "setuptools<80"
  # torch first and pinned: asked for by name it takes the CPU build; left to a resolver
  # that only sees "torch" from transformers it could pull the multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  args=()
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/python" -m pip install --quiet "${args[@]}"
  "$VENV/bin/python" scripts/fix_ros_wheels.py "$VENV"
  echo "$want" > "$stamp"
fi
