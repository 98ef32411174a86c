"""
The machine: facts (CPU, flags, versions) and its measured limits.

``machine_facts`` reads /proc/cpuinfo, package versions and the git commit without importing
the heavy libraries. ``measure_limits`` (run in a child process, so the thread variables of
BLAS are set before numpy loads: ``python -m vlm_ros_bench.hardware OUT.json ...``) measures

- memory read bandwidth: a sum over a large float32 array (default 1 GiB, far beyond the
  caches) three ways -- numpy on one thread, numpy split over ``threads`` Python threads at
  once (numpy releases the GIL in reductions) and ONNX Runtime's ``ReduceSum`` with
  ``threads`` intra-op threads (MLAS, vectorized for this CPU); best of several passes,
  bytes read / seconds; the largest is the machine's figure. A threaded ``copyto`` (bytes
  read + written) is reported beside it;
- matmul throughput: float32 ``n`` x ``n`` products through numpy's BLAS, torch
  (``torch.set_num_threads(threads)``) and ONNX Runtime's ``MatMul`` (MLAS), best of
  several, 2 n^3 / seconds; the largest is the peak. (numpy's OpenBLAS may not use every
  vector extension of a new CPU: on AVX-512 machines MLAS can be twice as fast.)
"""

import json
import os
import platform
import subprocess
import sys
import threading
import time

FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512vl',
         'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_int8',
         'amx_bf16', 'hypervisor')
PACKAGES = ('numpy', 'onnxruntime', 'llama_cpp_python', 'torch', 'transformers', 'tokenizers',
            'onnx', 'gguf', 'psutil', 'matplotlib')


def _cpuinfo():
    model, flags = '', set()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and not model:
                    model = value.strip()
                elif key == 'flags' and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor(), flags


def _git(repo):
    def run(*args):
        try:
            out = subprocess.run(['git', '-C', repo, *args], capture_output=True, text=True,
                                 timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run('rev-parse', 'HEAD')
    status = run('status', '--porcelain', '--untracked-files=no')
    return {'commit': commit, 'dirty': bool(status) if status is not None else None}


def package_versions():
    """Return installed versions (None when absent) without importing the packages."""
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_facts(threads, repo):
    """Return CPU model, core counts, instruction-set flags, memory, versions and commit."""
    import psutil

    model, flags = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        import llama_cpp
        llama_info = llama_cpp.llama_print_system_info().decode('utf-8', 'replace').strip()
    except Exception as exc:  # noqa: B902 -- the facts are reported, never required
        llama_info = f'unavailable: {exc}'
    try:
        import onnxruntime
        ort_providers = onnxruntime.get_available_providers()
    except Exception:  # noqa: B902
        ort_providers = []
    return {
        'cpu_model': model,
        'logical_cores': os.cpu_count(),
        'physical_cores': psutil.cpu_count(logical=False),
        'usable_cores': affinity,
        'threads_used': threads,
        'flags': {flag: flag in flags for flag in FLAGS},
        'memory_total_gb': psutil.virtual_memory().total / 1e9,
        'os': platform.platform(),
        'python': platform.python_version(),
        'versions': package_versions(),
        'llama_cpp_system_info': llama_info,
        'onnxruntime_providers': ort_providers,
        'git': _git(repo),
    }


def _best_seconds(fn, passes):
    best = float('inf')
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _in_threads(parts, fn):
    """Run ``fn(part)`` for every part at once, one Python thread each."""
    def run():
        workers = [threading.Thread(target=fn, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return run


def _ort_session(graph, threads):
    """Return an ONNX Runtime CPU session for a one-node graph (None without onnxruntime)."""
    try:
        import onnxruntime as ort
        from onnx import helper
    except ImportError:
        return None
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])


def _ort_read_gbps(data, threads, passes):
    from onnx import helper, TensorProto

    graph = helper.make_graph(
        [helper.make_node('ReduceSum', ['x'], ['y'], keepdims=0)], 'read',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [data.size])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [])])
    session = _ort_session(graph, threads)
    if session is None:
        return None
    feed = {'x': data}
    session.run(None, feed)
    return data.nbytes / _best_seconds(lambda: session.run(None, feed), passes) / 1e9


def _ort_matmul_gflops(a, b, threads, passes):
    from onnx import helper, numpy_helper, TensorProto

    n = a.shape[0]
    graph = helper.make_graph(
        [helper.make_node('MatMul', ['a', 'b'], ['c'])], 'matmul',
        [helper.make_tensor_value_info('a', TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info('c', TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b, 'b')])
    session = _ort_session(graph, threads)
    if session is None:
        return None
    feed = {'a': a}
    session.run(None, feed)
    return 2.0 * n ** 3 / _best_seconds(lambda: session.run(None, feed), passes) / 1e9


def measure_bandwidth(threads, megabytes, passes=5):
    """Return read bandwidth (three ways) and copy bandwidth, GB/s."""
    import numpy as np

    n = megabytes * 1024 * 1024 // 4
    data = np.ones(n, dtype=np.float32)
    dest = np.empty_like(data)
    nbytes = data.nbytes
    data.sum()
    single = nbytes / _best_seconds(data.sum, passes) / 1e9
    parts = np.array_split(data, threads)
    threaded = nbytes / _best_seconds(_in_threads(parts, np.sum), passes) / 1e9
    pairs = list(zip(np.array_split(dest, threads), parts, strict=True))
    copy = 2 * nbytes / _best_seconds(_in_threads(pairs, lambda p: np.copyto(*p)),
                                      passes) / 1e9
    del dest, pairs
    ort_read = _ort_read_gbps(data, threads, passes)
    return {
        'memory_read_gbps': max(v for v in (single, threaded, ort_read) if v),
        'read_single_thread_gbps': single,
        'read_threaded_gbps': threaded,
        'read_onnxruntime_gbps': ort_read,
        'copy_threaded_gbps': copy,
        'array_mb': megabytes,
        'passes': passes,
        'method': (f'sum of a {megabytes} MiB float32 array, best of {passes}: numpy on one '
                   f'thread, numpy in {threads} Python threads (1/{threads} each), ONNX '
                   f'Runtime ReduceSum with {threads} threads; memory_read_gbps is the '
                   f'largest. copy: {threads}-thread np.copyto, bytes read + written.'),
    }


def measure_matmul(threads, n, use_torch, passes=5):
    """Return float32 matmul throughput of numpy (BLAS) and torch, GFLOP/s."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    flop = 2.0 * n ** 3
    out = {'matmul_n': n, 'passes': passes,
           'numpy_gflops': flop / _best_seconds(lambda: a @ b, passes) / 1e9,
           'onnxruntime_gflops': _ort_matmul_gflops(a, b, threads, passes),
           'torch_gflops': None, 'torch_skipped': None}
    if use_torch:
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch.matmul(ta, tb)
        out['torch_gflops'] = flop / _best_seconds(lambda: torch.matmul(ta, tb), passes) / 1e9
    else:
        out['torch_skipped'] = 'not measured (--tiny)'
    out['peak_gflops'] = max(v for v in (out['numpy_gflops'], out['torch_gflops'],
                                         out['onnxruntime_gflops']) if v)
    out['method'] = (f'float32 {n}x{n} @ {n}x{n}, best of {passes}, 2n^3 FLOP; numpy through '
                     f'its BLAS with OPENBLAS_NUM_THREADS={threads}, torch with '
                     f'set_num_threads({threads}), ONNX Runtime MatMul with {threads} '
                     'intra-op threads; peak_gflops is the largest')
    return out


def measure_limits(threads, megabytes, matmul_n, use_torch):
    """Return the bandwidth and matmul measurements of this machine."""
    start = time.perf_counter()
    out = {'threads': threads, 'bandwidth': measure_bandwidth(threads, megabytes),
           'matmul': measure_matmul(threads, matmul_n, use_torch)}
    out['seconds'] = time.perf_counter() - start
    return out


def main(argv=None):
    """Command line for the child process: measure and write JSON."""
    import argparse

    parser = argparse.ArgumentParser(description='Measure memory bandwidth and matmul rate.')
    parser.add_argument('out')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--mb', type=int, default=1024)
    parser.add_argument('--matmul-n', type=int, default=2048)
    parser.add_argument('--no-torch', action='store_true')
    args = parser.parse_args(argv)
    result = measure_limits(args.threads, args.mb, args.matmul_n, not args.no_torch)
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
