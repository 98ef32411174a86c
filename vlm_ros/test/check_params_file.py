"""
Load a parameters YAML the way `ros2 run ... --params-file` does and validate it.

Run in its own process by test_node.py: it prints the parameter names the file sets and
exits 0 when vlm_node's validation accepts every value.
"""

import json
import sys

import rclpy
from vlm_ros.ros import params
from vlm_ros.ros.node import VlmNode


def main(path):
    """Print the overridden names as JSON; raise on any invalid value."""
    rclpy.init(args=['--ros-args', '--params-file', path])
    try:
        node = VlmNode()
        params.read_all(node)  # the checks configure runs first
        print(json.dumps(sorted(node._parameter_overrides)))
        node.queue.shutdown()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
