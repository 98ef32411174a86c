"""Shared inputs and helpers: the fixed image and prompt, statistics, process memory."""

import json
import os
import resource
import statistics
import subprocess
import sys

PROMPT = 'Describe the image. What is the robot doing on the table?'
IMAGE_SIZE = 512
IMAGE_SEED = 0
BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)


def repo_relative(doc):
    """
    Return a copy of a results document with this checkout's path cut from every string.

    Results are committed: they name files as the repository does, not as one machine does.
    """
    prefix = json.dumps(REPO.rstrip(os.sep) + os.sep)[1:-1]
    return json.loads(json.dumps(doc).replace(prefix, ''))


def bench_image(size=IMAGE_SIZE, seed=IMAGE_SEED):
    """
    Return the fixed benchmark image: RGB uint8 ``size`` x ``size``, the same in every process.

    Smooth gradients, a few flat shapes and mild noise, so that resampling and JPEG coding
    do the work they do on a photo.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx * yy) + 60], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 10, size // 3, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    cy, cx, r = size * 0.6, size * 0.4, size * 0.15
    disc = (np.mgrid[0:size, 0:size][0] - cy) ** 2 + (np.mgrid[0:size, 0:size][1] - cx) ** 2
    img[disc < r * r] = (230, 40, 40)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def summarize(values):
    """Return median, spread (min, max, quartiles) and the raw values; None when empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method='inclusive')
    else:
        q1 = q3 = ordered[0]
    return {'median': statistics.median(ordered), 'min': ordered[0], 'max': ordered[-1],
            'q1': q1, 'q3': q3, 'n': len(ordered), 'values': values}


def peak_rss_mb():
    """
    Return the peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this address space. Not
    ``ru_maxrss``: that survives ``execve`` and starts at the parent's RSS when the child
    was forked (or vforked) from it, so every worker would report at least its parent's size.
    """
    try:
        with open('/proc/self/status', encoding='utf-8') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != 'darwin' else peak / (1024.0 * 1024.0)


def reset_peak_rss():
    """
    Restart this process's peak-RSS count from its current RSS, so each case reports its own.

    Linux only (writing 5 to ``/proc/self/clear_refs``); elsewhere the peak keeps counting
    from process start, which overstates the later cases of a worker.
    """
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
            f.write('5')
    except OSError:
        pass


def rss_mb():
    """Return the current resident set size of this process, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / (1024.0 * 1024.0)


def child_env(threads=None):
    """Return the environment for a measuring child process: tooling importable, threads set."""
    env = dict(os.environ)
    extra = [BENCH_DIR, os.path.join(REPO, 'tools')]
    current = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    env['PYTHONPATH'] = os.pathsep.join(extra + [p for p in current if p not in extra])
    env.setdefault('HF_HUB_OFFLINE', '1')
    env.setdefault('TRANSFORMERS_OFFLINE', '1')
    env.setdefault('TOKENIZERS_PARALLELISM', 'false')
    if threads:
        for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
            env[name] = str(threads)
    return env


def run_child(module, spec, stem, env, timeout, label):
    """
    Run ``python -m module STEM.spec.json STEM.out.json`` with its output in ``STEM.log``.

    Returns (result, None), or (None, the failure with the log's tail).
    """
    spec_path, out_path, log_path = stem + '.spec.json', stem + '.out.json', stem + '.log'
    with open(spec_path, 'w', encoding='utf-8') as f:
        json.dump(spec, f, indent=1)
    failure = None
    with open(log_path, 'w') as log:
        try:
            proc = subprocess.run([sys.executable, '-m', module, spec_path, out_path],
                                  stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout)
            if proc.returncode != 0:
                failure = f'{label} exited with code {proc.returncode}'
        except subprocess.TimeoutExpired:
            failure = f'{label} timed out after {timeout:.0f} s'
    if failure is None and os.path.isfile(out_path):
        with open(out_path, encoding='utf-8') as f:
            return json.load(f), None
    with open(log_path, encoding='utf-8', errors='replace') as f:
        tail = f.read()[-1500:]
    return None, f'{failure or label + " wrote no result"}: {tail}'


def spec_main(argv, module, run):
    """Serve as the child side of ``run_child``: read SPEC.json, ``run(spec)``, write OUT."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f'usage: python -m {module} SPEC.json OUT.json', file=sys.stderr)
        return 2
    with open(argv[0], encoding='utf-8') as f:
        spec = json.load(f)
    result = run(spec)
    with open(argv[1], 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=1)
    return 0
