# Shared settings for the scripts in this folder; sourced, not run.
# ROS_DISTRO picks the PyPI ROS 2 wheels (kilted or jazzy); each distro gets its own venv and
# colcon build/install trees so switching never mixes them.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROS_DISTRO="${ROS_DISTRO:-kilted}"
case "$ROS_DISTRO" in
  kilted|jazzy) ;;
  *) echo "ROS_DISTRO must be kilted or jazzy (got '$ROS_DISTRO')" >&2; exit 2 ;;
esac
if [ "$ROS_DISTRO" = kilted ]; then VENV="$ROOT/.venv"; else VENV="$ROOT/.venv-$ROS_DISTRO"; fi
BUILD_BASE="$ROOT/build/$ROS_DISTRO"
INSTALL_BASE="$ROOT/install/$ROS_DISTRO"
PYTHON="${PYTHON:-python3}"
export ROS_DISTRO VENV BUILD_BASE INSTALL_BASE ROOT
