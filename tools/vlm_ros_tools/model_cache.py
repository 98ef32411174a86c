"""
The tiny test models by name, with or without PyTorch.

The factories and exporters (``export_onnx``, ``export_internvl``, ``gguf_export``) need
torch and transformers, and name each cached model after a hash of the tooling sources *and*
the library versions, so an environment without torch -- the Humble stand-in,
``ROS_DISTRO=humble`` -- can neither build the models nor compute where they are.  This module
is the torch-free way in:

* With torch importable (Kilted / Jazzy environments), ``cached_test_model``,
  ``cached_internvl_model``, ``cached_gguf``, ``cached_internvl_gguf``, ``cached_mmproj``,
  ``cached_qwen2vl_gguf`` and ``cached_qwen2vl_mmproj`` (among others) call the factories'
  and exporters' functions of the same name and signature (building once, as before) and
  record the answer in ``<cache_root()>/manifest.json``.  The exporters' model folders
  come from ``build_once``: ``<cache_root()>/<name>-<build_fingerprint(...)>``, built in a
  temporary folder and renamed into place.
* Without torch (or with ``VLM_ROS_TEST_MODELS_LOOKUP=1``), the same calls only look the
  model up in the manifest; a model that was never recorded, whose files are gone, or whose
  tooling sources changed since it was built raises ``NotCached`` with what to run.

Each manifest entry holds the path relative to the cache root and a hash of the tooling
source files that made it (``sources_digest``: no library versions, so both sides can
compute it; the folder names hash the same digest with the library versions).  Fill the
manifest from an environment with torch, e.g. after ``source scripts/ros_env.sh``::

    python -m vlm_ros_tools.model_cache build      # every model the suite uses
    python -m vlm_ros_tools.model_cache list       # what the manifest holds, fresh or stale

Nothing here imports torch, transformers or onnx at module level.
"""

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

CACHE_ENV = 'VLM_ROS_TEST_MODELS'
LOOKUP_ENV = 'VLM_ROS_TEST_MODELS_LOOKUP'
MANIFEST = 'manifest.json'
_HERE = os.path.dirname(os.path.abspath(__file__))

# The tooling sources each kind of model depends on (what the model folders' names hash).
_SMOLVLM_SOURCES = ('hub_files.py', 'tiny_tokenizer.py', 'smolvlm_factory.py', 'export_onnx.py')
_INTERNVL_SOURCES = _SMOLVLM_SOURCES + ('internvl_factory.py', 'export_internvl.py')
_QWEN2VL_SOURCES = ('hub_files.py', 'tiny_tokenizer.py', 'internvl_factory.py',
                    'qwen2vl_factory.py')
SOURCES = {
    'smolvlm': _SMOLVLM_SOURCES,
    'internvl': _INTERNVL_SOURCES,
    'gguf': _SMOLVLM_SOURCES + ('gguf_export.py',),
    'mmproj': _SMOLVLM_SOURCES + ('gguf_export.py',),
    'internvl-gguf': _INTERNVL_SOURCES + ('gguf_export.py',),
    'qwen2vl': _QWEN2VL_SOURCES,
    # Both GGUF files of a Qwen2-VL export: the language model and the mmproj.
    'qwen2vl-gguf': _QWEN2VL_SOURCES + ('gguf_export.py',),
    'qwen2vl-onnx': _QWEN2VL_SOURCES + ('export_onnx.py', 'export_qwen2vl.py'),
}
# The libraries whose versions the model folders' names hash (they shape the exports).
LIBRARIES = ('torch', 'transformers', 'onnx', 'onnxruntime', 'tokenizers')


class NotCached(LookupError):
    """A test model is not in the cache and this environment cannot build it."""


def cache_root():
    """Return the test model cache (``$VLM_ROS_TEST_MODELS`` or <repo>/.cache/test_models)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return os.path.abspath(root)
    return os.path.join(os.path.dirname(os.path.dirname(_HERE)), '.cache', 'test_models')


def can_build():
    """Return True when this environment can build models (torch and transformers import)."""
    if os.environ.get(LOOKUP_ENV, '') not in ('', '0'):
        return False
    return all(importlib.util.find_spec(m) is not None for m in ('torch', 'transformers'))


def sources_digest(kind):
    """Hash of the tooling source files that a model of ``kind`` is built from."""
    digest = hashlib.sha256()
    for name in SOURCES[kind]:
        with open(os.path.join(_HERE, name), 'rb') as f:
            digest.update(name.encode() + b'\0' + f.read())
    return digest.hexdigest()[:16]


def build_fingerprint(kind, **build_args):
    """
    Hash of ``kind``'s tooling sources, the library versions and the build arguments.

    The exporters' model folders are named after it.  The versions come from the installed
    package metadata, so nothing is imported.
    """
    from importlib import metadata

    digest = hashlib.sha256(f'{kind}:{sources_digest(kind)};'.encode())
    for package in LIBRARIES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = 'none'
        digest.update(f'{package}={version};'.encode())
    for name, value in sorted(build_args.items()):
        digest.update(f'{name}={value!r};'.encode())
    return digest.hexdigest()[:16]


def build_once(kind, name, write, **build_args):
    """
    Return the folder ``<cache_root()>/<name>-<build_fingerprint(kind, **build_args)>``.

    When it is missing, ``write(folder, **build_args)`` writes the model into a temporary
    folder that is renamed into place, so concurrent callers never see a half-written model
    (the first rename wins).  Editing the tooling sources, changing a library or other build
    arguments make another folder.
    """
    root = cache_root()
    target = os.path.join(root, f'{name}-{build_fingerprint(kind, **build_args)}')
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.build-{name}-', dir=root)
    try:
        write(tmp, **build_args)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_manifest(root=None):
    """Return the manifest's entries (key -> {'kind', 'path', 'sources'}); {} if none."""
    try:
        with open(os.path.join(root or cache_root(), MANIFEST), encoding='utf-8') as f:
            return json.load(f).get('models', {})
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(root):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MANIFEST + '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record(key, kind, path):
    """Record that ``key`` (a model of ``kind``) is at ``path``; return ``path``."""
    root = cache_root()
    entry = {'kind': kind, 'path': os.path.relpath(os.path.abspath(path), root),
             'sources': sources_digest(kind)}
    with _locked(root):
        models = read_manifest(root)
        if models.get(key) == entry:
            return path
        models[key] = entry
        fd, tmp = tempfile.mkstemp(prefix='.manifest-', dir=root)
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump({'models': dict(sorted(models.items()))}, f, indent=1)
            f.write('\n')
        os.replace(tmp, os.path.join(root, MANIFEST))
    return path


def status(key, entry, root=None):
    """Return (absolute path, problem or None) of a manifest entry."""
    path = os.path.join(root or cache_root(), entry['path'])
    if not os.path.exists(path):
        return path, f'{path} is gone'
    if entry.get('sources') != sources_digest(entry['kind']):
        return path, 'the tooling sources changed since it was built'
    return path, None


def lookup(key):
    """Return the recorded path of ``key``, or raise ``NotCached``."""
    entry = read_manifest().get(key)
    how = ('build it where torch is installed: source scripts/ros_env.sh (ROS_DISTRO=kilted) '
           'and run python -m vlm_ros_tools.model_cache build')
    if entry is None:
        raise NotCached(f'test model {key!r} is not in {os.path.join(cache_root(), MANIFEST)}; '
                        + how)
    path, problem = status(key, entry)
    if problem:
        raise NotCached(f'test model {key!r}: {problem}; ' + how)
    return path


def _get(key, kind, build):
    if can_build():
        return record(key, kind, build())
    return lookup(key)


# The exporters' cached_* functions, by the same names and signatures. ---------------------

def _tiny_model(kind, module, function, variant, seed, quantize_int8):
    """Return a tiny ``kind`` model's folder, built by ``<module>.<function>`` with torch."""
    key = f'{kind}-{variant}' + (f'-seed{seed}' if seed else '') + (
        '' if quantize_int8 else '-noint8')

    def build():
        build_model = getattr(importlib.import_module(f'.{module}', __package__), function)
        return build_model(variant, seed=seed, quantize_int8=quantize_int8)
    return _get(key, kind, build)


def cached_test_model(variant='a', seed=0, quantize_int8=True):
    """Return the tiny SmolVLM ``variant``'s folder (``export_onnx.cached_test_model``)."""
    return _tiny_model('smolvlm', 'export_onnx', 'cached_test_model', variant, seed,
                       quantize_int8)


def cached_internvl_model(variant='a', seed=0, quantize_int8=True):
    """Return the tiny InternVL ``variant``'s folder (``export_internvl``)."""
    return _tiny_model('internvl', 'export_internvl', 'cached_internvl_model', variant, seed,
                       quantize_int8)


def cached_gguf(variant='a', ftype='f32', arch='llama'):
    """Return the tiny SmolVLM's language model as a GGUF file (``gguf_export.cached_gguf``)."""
    key = f'gguf-{variant}-{ftype}' + ('' if arch == 'llama' else f'-{arch}')

    def build():
        from .gguf_export import cached_gguf as build_model
        return build_model(variant, ftype, arch)
    return _get(key, 'gguf', build)


def cached_internvl_gguf(variant='a', ftype='f32'):
    """Return the tiny InternVL's Qwen2 language model as a GGUF file."""
    def build():
        from .gguf_export import cached_internvl_gguf as build_model
        return build_model(variant, ftype)
    return _get(f'internvl-gguf-{variant}-{ftype}', 'internvl-gguf', build)


def cached_mmproj(variant='a', ftype='f32', preproc_image_size=None):
    """Return the tiny SmolVLM's projector as an mmproj GGUF (``gguf_export.cached_mmproj``)."""
    key = f'mmproj-{variant}-{ftype}' + (
        '' if preproc_image_size is None else f'-{preproc_image_size}')

    def build():
        from .gguf_export import cached_mmproj as build_model
        return build_model(variant, ftype, preproc_image_size)
    return _get(key, 'mmproj', build)


def cached_qwen2vl_model(variant='qwen2-a', seed=0):
    """Return the tiny Qwen2-VL / Qwen2.5-VL ``variant``'s folder (``qwen2vl_factory``)."""
    def build():
        from .qwen2vl_factory import cached_qwen2vl_model as build_model
        return build_model(variant, seed=seed)
    return _get(f'qwen2vl-{variant}' + (f'-seed{seed}' if seed else ''), 'qwen2vl', build)


def cached_qwen2vl_onnx_model(variant='qwen2-a', seed=0, quantize_int8=True):
    """Return the tiny Qwen2(.5)-VL ``variant`` with its ONNX vision encoder (``onnx/``)."""
    return _tiny_model('qwen2vl-onnx', 'export_qwen2vl', 'cached_qwen2vl_onnx_model', variant,
                       seed, quantize_int8)


def cached_qwen2vl_gguf(variant='qwen2-a', ftype='f32'):
    """Return the tiny Qwen2(.5)-VL's language model as a ``qwen2vl`` GGUF file."""
    def build():
        from .gguf_export import cached_qwen2vl_gguf as build_model
        return build_model(variant, ftype)
    return _get(f'qwen2vl-gguf-{variant}-{ftype}', 'qwen2vl-gguf', build)


def cached_qwen2vl_mmproj(variant='qwen2-a', ftype='f32'):
    """Return the tiny Qwen2(.5)-VL's vision tower and merger as an mmproj GGUF file."""
    def build():
        from .gguf_export import cached_qwen2vl_mmproj as build_model
        return build_model(variant, ftype)
    return _get(f'qwen2vl-mmproj-{variant}-{ftype}', 'qwen2vl-gguf', build)


# What ``build`` makes: every model the test suite asks for.
def suite_models():
    """Return (description, zero-argument builder) of every model the test suite uses."""
    out = []
    for v in ('a', 'b'):
        out.append((f'smolvlm {v}', lambda v=v: cached_test_model(v)))
        out.append((f'internvl {v}', lambda v=v: cached_internvl_model(v)))
        for ftype in ('f32', 'f16', 'q8_0', 'q4_0'):
            out.append((f'gguf {v} {ftype}', lambda v=v, t=ftype: cached_gguf(v, t)))
        out.append((f'gguf {v} f32 qwen2', lambda v=v: cached_gguf(v, 'f32', 'qwen2')))
        out.append((f'internvl gguf {v} f32', lambda v=v: cached_internvl_gguf(v, 'f32')))
        out.append((f'mmproj {v} f32', lambda v=v: cached_mmproj(v, 'f32')))
    for v in ('qwen2-a', 'qwen2-b', 'qwen25-a', 'qwen25-b'):
        out.append((f'qwen2vl {v}', lambda v=v: cached_qwen2vl_model(v)))
        out.append((f'qwen2vl gguf {v} f32', lambda v=v: cached_qwen2vl_gguf(v, 'f32')))
        out.append((f'qwen2vl mmproj {v} f32', lambda v=v: cached_qwen2vl_mmproj(v, 'f32')))
        out.append((f'qwen2vl onnx {v}', lambda v=v: cached_qwen2vl_onnx_model(v)))
    out.append(('qwen2vl gguf qwen2-a q8_0', lambda: cached_qwen2vl_gguf('qwen2-a', 'q8_0')))
    return out


def main(argv=None):
    """Command line: ``build`` the suite's models (needs torch) or ``list`` the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('command', choices=('build', 'list'))
    args = parser.parse_args(argv)
    if args.command == 'build':
        if not can_build():
            print('model_cache build needs torch and transformers (the Kilted or Jazzy venv)',
                  file=sys.stderr)
            return 2
        for name, build in suite_models():
            print(f'{name}: {os.path.relpath(build(), cache_root())}', flush=True)
        return 0
    models = read_manifest()
    if not models:
        print(f'no manifest in {cache_root()}')
        return 1
    bad = 0
    for key, entry in models.items():
        path, problem = status(key, entry)
        bad += problem is not None
        print(f'{key}: {entry["path"]}' + (f'  [{problem}]' if problem else ''))
    return 1 if bad else 0


if __name__ == '__main__':
    raise SystemExit(main())
