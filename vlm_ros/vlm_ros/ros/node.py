"""The ``vlm_node`` lifecycle node."""

import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node, State, TransitionCallbackReturn

from vlm_ros.ros import params


class VlmNode(Node):
    """Answers questions about images; sessions live only while the node is active."""

    def __init__(self, **kwargs):
        super().__init__('vlm_node', **kwargs)
        params.declare_all(self)
        self.config = None

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self.config = params.read_all(self)
        except ValueError as exc:
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info('configured')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().info('inactive')
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self.config = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.config = None
        return TransitionCallbackReturn.SUCCESS


def main(args=None):
    """Run the node until shutdown (``ros2 run vlm_ros vlm_node --ros-args ...``)."""
    rclpy.init(args=args)
    try:
        node = VlmNode()
    except ValueError as exc:
        print(f'vlm_node: {exc}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        if node.get_parameter('autostart').value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
