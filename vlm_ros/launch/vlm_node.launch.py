"""Start vlm_node as a lifecycle node with a parameters file and the usual remaps."""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    """Arguments: params_file, namespace, node_name and the topic remaps."""
    args = [
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution(
                [FindPackageShare('vlm_ros'), 'config', 'default.yaml']),
            description='Parameters YAML (see config/ for one per model).'),
        DeclareLaunchArgument('namespace', default_value='', description='Node namespace.'),
        DeclareLaunchArgument('node_name', default_value='vlm_node', description='Node name.'),
        DeclareLaunchArgument('image_topic', default_value='image',
                              description='Camera image topic (sensor_msgs/Image).'),
        DeclareLaunchArgument('prompt_topic', default_value='prompt',
                              description='Prompt topic (std_msgs/String).'),
        DeclareLaunchArgument('result_topic', default_value='result',
                              description='Answer topic (std_msgs/String).'),
    ]
    image_topic = LaunchConfiguration('image_topic')
    node = LifecycleNode(
        package='vlm_ros',
        executable='vlm_node',
        name=LaunchConfiguration('node_name'),
        namespace=LaunchConfiguration('namespace'),
        parameters=[LaunchConfiguration('params_file')],
        remappings=[
            ('image', image_topic),
            ('image/compressed', [image_topic, '/compressed']),
            ('prompt', LaunchConfiguration('prompt_topic')),
            ('result', LaunchConfiguration('result_topic')),
        ],
        output='screen',
        emulate_tty=True,
    )
    return LaunchDescription(args + [node])
