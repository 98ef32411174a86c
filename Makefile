# Entry points; ROS_DISTRO=kilted (default) or jazzy picks the PyPI ROS 2 wheels.
# Everything lives inside this repository (.venv*, build/, install/, log/, .cache/).
ROS_DISTRO ?= kilted
export ROS_DISTRO

.PHONY: setup build test demo bench lint clean

setup:
	scripts/setup.sh

build:
	scripts/build.sh

test:
	scripts/test.sh $(PYTEST_ARGS)

demo:
	scripts/demo.sh $(ROS_ARGS)

bench:
	scripts/bench.sh $(BENCH_ARGS)

lint:
	scripts/test.sh -m lint

clean:
	rm -rf build install log .cache
