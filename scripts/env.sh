# Shared settings for the scripts in this folder; sourced, not run.
# ROS_DISTRO picks the PyPI ROS 2 wheels: kilted or jazzy, or humble, the Humble stand-in
# (Python 3.10, Jazzy's wheels, Ubuntu 22.04's versions of the apt-provided Python packages
# and the oldest supported pip-only ones; see README "The Humble stand-in"). Each distro gets
# its own venv and colcon build/install trees so switching never mixes them.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROS_DISTRO="${ROS_DISTRO:-kilted}"
case "$ROS_DISTRO" in
  kilted|jazzy) ROS_WHEELS="$ROS_DISTRO" ;;
  # No Humble on PyPI: Jazzy, the LTS nearest to it, supplies rclpy and Fast DDS (2.14).
  humble) ROS_WHEELS=jazzy ;;
  *) echo "ROS_DISTRO must be kilted, jazzy or humble (got '$ROS_DISTRO')" >&2; exit 2 ;;
esac
if [ "$ROS_DISTRO" = kilted ]; then VENV="$ROOT/.venv"; else VENV="$ROOT/.venv-$ROS_DISTRO"; fi
BUILD_BASE="$ROOT/build/$ROS_DISTRO"
INSTALL_BASE="$ROOT/install/$ROS_DISTRO"
if [ "$ROS_DISTRO" = humble ]; then
  # Humble's Python (Ubuntu 22.04). A pyenv shim named python3.10 may exist without the
  # version being selected, so fall back to pyenv's own 3.10 install.
  if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3.10
    if ! "$PYTHON" -c '' 2>/dev/null && command -v pyenv >/dev/null 2>&1; then
      for _py in "$(pyenv root)"/versions/3.10*/bin/python3.10; do
        [ -x "$_py" ] && PYTHON="$_py"
      done
      unset _py
    fi
  fi
  PYTHON_VERSION=3.10
else
  PYTHON="${PYTHON:-python3}"
  PYTHON_VERSION=
fi
export ROS_DISTRO ROS_WHEELS VENV BUILD_BASE INSTALL_BASE ROOT

# Confine DDS discovery to this host with the variable the distro reads: Humble (and older)
# only know ROS_LOCALHOST_ONLY; Iron and later read ROS_AUTOMATIC_DISCOVERY_RANGE and print a
# deprecation warning for ROS_LOCALHOST_ONLY. A value the caller already set is kept.
vlm_ros_localhost_discovery() {
  if [ "$ROS_DISTRO" = humble ]; then
    export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
  else
    export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
  fi
}
