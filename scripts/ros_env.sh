# Source this (bash) after scripts/build.sh: the venv's ROS 2 plus this repository's
# built packages, the way `source /opt/ros/<distro>/setup.bash && source install/setup.bash`
# would be on a robot.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$VENV/bin/activate"
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
_vlm_ros_nounset=$(set -o | awk '$1 == "nounset" {print $2}')
set +u
source "$INSTALL_BASE/setup.bash"
[ "$_vlm_ros_nounset" = on ] && set -u
unset _vlm_ros_nounset
# The tooling package (tiny-model factories, exporters) is test/dev only: never installed.
export PYTHONPATH="$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
# What `ros2 run vlm_ros <exe>` would find (ros2cli is not on PyPI): vlm_node, vlm_ask.
export PATH="$INSTALL_BASE/vlm_ros/lib/vlm_ros:$PATH"
