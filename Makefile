# Entry points; ROS_DISTRO=kilted (default) or jazzy picks the PyPI ROS 2 wheels, humble the
# Humble stand-in (Python 3.10, Jazzy's wheels, Ubuntu 22.04's package versions).
# Everything lives inside this repository (.venv*, build/, install/, log/, .cache/).
ROS_DISTRO ?= kilted
export ROS_DISTRO

.PHONY: setup build test demo bench bench-serve lint clean

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

# vlm_serve under load (evalscope perf, in .venv-evalscope); not part of CI.
bench-serve:
	benchmarks/serve_bench.sh $(BENCH_ARGS)

lint:
	scripts/test.sh -m lint

clean:
	rm -rf build install log .cache
