#!/usr/bin/env bash
# Create the venv with a real ROS 2 from PyPI wheels, colcon and every dependency, then patch
# the wheels' CMake exports so colcon can build interface packages. Idempotent and quick when
# nothing changed: pip runs only when a requirements file (or the distro) changed.
# ROS_DISTRO=humble builds the Humble stand-in: Python 3.10, Jazzy's wheels, no PyTorch, and
# requirements/humble.txt's pins as constraints.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "Python 3.10+ required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 2
fi
if [ -n "$PYTHON_VERSION" ] && [ "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$PYTHON_VERSION" ]; then
  echo "ROS_DISTRO=$ROS_DISTRO needs Python $PYTHON_VERSION (set PYTHON=/path/to/python$PYTHON_VERSION)" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

reqs=(requirements/runtime.txt requirements/dev.txt "requirements/ros-$ROS_WHEELS.txt")
constraints=()
if [ "$ROS_DISTRO" = humble ]; then
  constraints=(requirements/humble.txt)
else
  reqs+=(requirements/reference.txt)
fi
want="$(cat "${reqs[@]}" "${constraints[@]}" scripts/setup.sh scripts/fix_ros_wheels.py | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.vlm_ros_setup"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # llama-cpp-python compiles llama.cpp for this CPU (-march=native). On CPUs with AMX that
  # includes llama.cpp's AMX kernels, which die with SIGILL (tilezero) in quantized matmuls
  # (seen on this project's x86_64 machines; llama.cpp PR #26954): leave AMX out. A wheel
  # pip built and cached before this setting is reused; `pip cache remove llama_cpp_python`.
  if [ "$(uname -m)" = x86_64 ] && [ -z "${CMAKE_ARGS:-}" ]; then
    no_amx='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
    export CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip wheel "setuptools<80"
  args=()
  if [ "$ROS_DISTRO" = humble ]; then
    # PyYAML 5.4.1 (Ubuntu 22.04's) has no wheel for Python 3.10 and its sdist does not build
    # with Cython 3: build it first with Cython < 3 in the isolated build environment.
    printf 'cython<3\n' > "$VENV/.build-constraints.txt"
    "$VENV/bin/python" -m pip install --quiet --build-constraint "$VENV/.build-constraints.txt" \
      "$(grep -i '^pyyaml==' requirements/humble.txt)"
    args+=(-c requirements/humble.txt)
  else
    # torch first and pinned: asked for by name it takes the CPU build; left to a resolver
    # that only sees "torch" from transformers it could pull the multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  fi
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/python" -m pip install --quiet "${args[@]}"
  "$VENV/bin/python" scripts/fix_ros_wheels.py "$VENV"
  echo "$want" > "$stamp"
fi
