"""ament_python package: the vlm_ros engine (plain Python) and its ROS 2 node."""

import glob
import os

from setuptools import find_packages, setup

package_name = 'vlm_ros'


def share_tree(folder):
    """List (install dir, files) pairs that mirror ``folder`` under share/vlm_ros."""
    pairs = []
    for root, _dirs, files in os.walk(folder):
        if files:
            pairs.append((os.path.join('share', package_name, root),
                          [os.path.join(root, f) for f in files]))
    return pairs


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob.glob('launch/*.launch.py')),
        ('share/' + package_name + '/config',
         glob.glob('config/*.yaml') + glob.glob('config/*.xml')),
        # vlm_models' catalogue: in its own folder, so config/*.yaml stay parameter files.
        ('share/' + package_name + '/config/catalogue', glob.glob('config/catalogue/*.yaml')),
    ] + share_tree('models') + share_tree('samples'),
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='vlm_ros maintainers',
    maintainer_email='maintainers@vlm-ros.org',
    description='Ask an on-device vision-language model about camera images from ROS 2.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'vlm_node = vlm_ros.ros.node:main',
            'vlm_ask = vlm_ros.engine.cli:main',
            'vlm_serve = vlm_ros.serve.main:main',
            'vlm_models = vlm_ros.models_cli.main:main',
        ],
    },
)
