"""Shared inputs and helpers: the fixed image and prompt, statistics, process memory."""

import os
import resource
import statistics
import sys

PROMPT = 'Describe the image. What is the robot doing on the table?'
IMAGE_SIZE = 512
IMAGE_SEED = 0
BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)


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
