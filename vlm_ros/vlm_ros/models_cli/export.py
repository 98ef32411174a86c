"""
``vlm_models export``: make the files no hub publishes, on a workstation with PyTorch.

The official transformers checkpoint is fetched (the configuration's hub files plus the
weights, checked like any download; a ``model.safetensors.index.json`` brings the shards it
names) unless it is already in the folder; the project's exporters (``tools/vlm_ros_tools``)
write each missing file; each one is then checked against transformers on sample images
before it takes its place:

* ``internvl-vision-onnx`` (``export_internvl``): the ONNX vision encoder's features against
  ``get_image_features`` on the same pixels (the engine's own preprocessing, several tiles),
  then the first greedy tokens of transformers' model fed its own image features against
  the same model fed the ONNX features;
* ``qwen2-gguf-q8_0`` (``gguf_export``): the language model as a Q8_0 GGUF, run by the
  engine's llama.cpp decoder on the prompt of a sample image without it, against
  transformers' first logits (same best token, cosine >= 0.99) and greedy tokens;
* ``qwen2vl-gguf-q8_0``: the same for the language model of Qwen2-VL / Qwen2.5-VL (VLM-R1
  too), as a GGUF of llama.cpp's ``qwen2vl`` architecture (M-RoPE);
* ``qwen2vl-mmproj-f16``: their vision tower and merger as an f16 mmproj GGUF, run by
  libmtmd through the engine's ``MtmdImageEncoder`` (bound to the configuration's language
  model GGUF, with the processor's token budget), against ``get_image_features`` on each
  sample resized to the processor's grid, so that neither side resizes it again.

torch, transformers and the tools are imported only here, never on a robot.
"""

import contextlib
import os
import pathlib
import sys

import numpy as np

from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.families.internvl import InternVLFamily
from vlm_ros.engine.families.qwen2_vl import Qwen2VLFamily
from vlm_ros.models_cli import download, hashing, manifest, transfer

FEATURE_TOLERANCE = 1e-3
"""Largest |ONNX - torch| feature difference, relative to the largest |torch| feature."""
MMPROJ_F16_TOLERANCE = 5e-3
"""
The same for an f16 mmproj run by libmtmd: its float16 weights, and libmtmd's float16 patch
embedding, give up to 8e-4 on the tiny test models (6e-4 with an f32 mmproj).
"""
LOGIT_COSINE = 0.99
PROMPT = 'Describe this image.'
INSTALL_HINT = ('vlm_models export needs PyTorch, transformers and onnx (pip install -r '
                "requirements/reference.txt) and the project's exporters in tools/ of a "
                'vlm_ros checkout on PYTHONPATH (`source scripts/ros_env.sh` sets both up)')


class ExportCheckError(RuntimeError):
    """An exported file does not behave like the checkpoint; the message has the numbers."""


def require_tools():
    """Import the exporters' dependencies; raise ImportError saying what to install."""
    missing = []
    for module in ('torch', 'transformers', 'onnx', 'vlm_ros_tools.export_internvl',
                   'vlm_ros_tools.gguf_export'):
        try:
            __import__(module)
        except ImportError as exc:
            missing.append(f'{module} ({exc})')
    if missing:
        raise ImportError(f'{INSTALL_HINT}; cannot import: {"; ".join(missing)}')


def run(configuration, folder, fetch=True, images=None, tokens=8, out=sys.stdout) -> int:
    """Export ``configuration``'s missing files into ``folder``; return the exit code."""
    if not configuration.products:
        print(f'{configuration.name}: nothing to export, every file is on the hub '
              f'(`vlm_models download {configuration.name}`)', file=out)
        return download.EXIT_OK
    try:
        require_tools()
    except ImportError as exc:
        print(f'vlm_models: {exc}', file=sys.stderr)
        return download.EXIT_FAILED
    job = download.Run(configuration, folder, out=out)
    if fetch:
        job.fetch_sources(include_checkpoint=True)
        job.save_manifest()
        if job.failures:
            print(f'vlm_models: cannot export {configuration.name}: the checkpoint is '
                  'incomplete (see above)', file=sys.stderr)
            return download.EXIT_FAILED
    needed = configuration.required_paths() + [f.path for f in configuration.checkpoint]
    needed += download.checkpoint_shards(job.folder, configuration.checkpoint)
    needed = [p for p in needed if p not in {x.path for x in configuration.products}]
    absent = [p for p in needed if not (job.folder / p).is_file()]
    if absent:
        print(f'vlm_models: the checkpoint in {job.folder} lacks {", ".join(absent)}',
              file=sys.stderr)
        return download.EXIT_FAILED
    samples = _sample_images(images)
    model = _load_model(job.folder)
    failed = 0
    for product in configuration.products:
        try:
            _export_one(job.folder, configuration, product, model, samples, tokens, out)
        except (ExportCheckError, ValueError, NotImplementedError, VlmError) as exc:
            # VlmError: the engine refused the file (a projector that does not fit the
            # language model, say); the next product is still worth making.
            print(f'FAIL export {product.path}: {exc}', file=out, flush=True)
            failed += 1
    print(f'{configuration.name}: ' + (f'{failed} export(s) failed' if failed else
                                       f'exported and checked in {job.folder}'), file=out)
    return download.EXIT_FAILED if failed else download.EXIT_OK


EXPORTERS = {}


def exporter(name):
    """
    Register an exporter class under ``name``.

    ``make(model, folder, path)`` writes the file; ``check(model, folder, path, samples,
    tokens, configuration)`` compares it with transformers' ``model``, yielding a line per
    passed check and raising ExportCheckError on a failed one. ``families`` holds the
    registry keys of the model families whose checkpoints it converts.
    """
    def register(cls):
        EXPORTERS[name] = cls
        return cls
    return register


def _export_one(folder, configuration, product, model, samples, tokens, out):
    kind = EXPORTERS.get(product.exporter)
    if kind is None:
        raise ValueError(f'unknown exporter {product.exporter!r} (known: {sorted(EXPORTERS)})')
    family = _family_key(configuration)
    if getattr(kind, 'families', None) and family not in kind.families:
        raise ValueError(f'{product.exporter} converts {", ".join(kind.families)} checkpoints, '
                         f'not the {family} that {configuration.params_file.name} names')
    dest = folder / product.path
    tmp = folder / transfer.PART_DIR / 'export' / product.path
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f'export {product.path} ({product.exporter}) ...', file=out, flush=True)
    try:
        kind.make(model, folder, tmp)
        for line in kind.check(model, folder, tmp, samples, tokens, configuration):
            print(f'PASS {line}', file=out, flush=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    sha256, blob_id = hashing.digests(dest)
    recorded = manifest.read(folder)
    commits = {s.get('repo'): s.get('commit') for s in recorded.get('sources', [])}
    source = configuration.sources[0].repo
    manifest.update(folder, configuration.name, {product.path: {
        'repo': f'exported from {source}', 'commit': commits.get(source),
        'exporter': product.exporter, 'size': dest.stat().st_size, 'sha256': sha256,
        'git_blob_sha1': blob_id}})
    print(f'  {product.path}: {dest.stat().st_size} bytes, sha256 {sha256}', file=out)


def _family_key(configuration):
    """Return the registry key of the family the configuration's ``model_type`` names."""
    from vlm_ros.engine.families import registry
    return registry.by_param(int(configuration.params().get('model_type', 1))).info.key


def _load_model(folder):
    from vlm_ros_tools.export_onnx import load_model_for_export
    return load_model_for_export(str(folder))


def _sample_images(paths):
    """Return RGB arrays: the given images, else the bundled sample and a generated one."""
    from vlm_ros.engine.images import to_rgb
    if paths:
        return [(pathlib.Path(p).name, to_rgb(p)) for p in paths]
    samples = []
    bundled = pathlib.Path(__file__).resolve().parents[2] / 'samples' / 'scene.png'
    if bundled.is_file():
        samples.append(('scene.png', to_rgb(str(bundled))))
    # A wide gradient with noise: another aspect ratio, so the encoder sees several tiles.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:640]
    base = np.stack([xx * 255 / 640, yy * 255 / 240, (xx + yy) * 127 / 880], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    samples.append(('gradient 640x240', pixels))
    return samples


def _prepare(folder, rgb, with_image=True):
    """Return (input_ids, pixel_values or None, image token id) the engine would feed."""
    from vlm_ros.engine.datatypes import ImageOptions
    from vlm_ros.engine.families import load_family
    family = load_family(folder)
    request = family.prepare(rgb if with_image else None, PROMPT,
                             image_options=ImageOptions(True, 4))
    return (request.input_ids, request.vision_inputs.get('pixel_values'),
            request.image_token_id)


def _greedy(model, n, **inputs):
    """Return transformers' first ``n`` greedy tokens (new tokens only)."""
    import torch
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    ids = ids[0].tolist()
    prompt = inputs.get('input_ids')
    return ids[prompt.shape[1]:] if prompt is not None and len(ids) > n else ids


@exporter('internvl-vision-onnx')
class InternVLVisionOnnx:
    """The InternVL vision tower, pixel shuffle and projector as ``vision_encoder.onnx``."""

    families = (InternVLFamily.info.key,)

    @staticmethod
    def make(model, folder, path):
        """Write the ONNX graph (``export_internvl.export_vision_encoder``)."""
        import torch
        from vlm_ros_tools.export_internvl import export_vision_encoder
        with torch.no_grad():
            export_vision_encoder(model, str(path))

    @staticmethod
    def check(model, folder, path, samples, tokens, configuration=None):
        """Compare features and first tokens with transformers; yield what passed."""
        import onnxruntime as ort
        import torch
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        config = model.config
        for name, rgb in samples:
            ids, pixels, image_token = _prepare(folder, rgb)
            onnx_features = session.run(['image_features'], {'pixel_values': pixels})[0]
            with torch.no_grad():
                out = model.get_image_features(
                    pixel_values=torch.from_numpy(pixels),
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy)
            ref = out if torch.is_tensor(out) else out.pooler_output
            ref = ref.float().numpy().reshape(onnx_features.shape)
            diff = float(np.max(np.abs(onnx_features - ref)))
            scale = float(np.max(np.abs(ref))) or 1.0
            if diff > FEATURE_TOLERANCE * scale:
                raise ExportCheckError(
                    f'{name}: image features differ from transformers by up to {diff:.3g} '
                    f'(largest feature {scale:.3g}, tolerance {FEATURE_TOLERANCE:g} of it)')
            yield (f'features {name}: {pixels.shape[0]} tiles, max |onnx - transformers| '
                   f'{diff:.2g} of max |feature| {scale:.3g}')
            input_ids = torch.from_numpy(ids[None])
            mask = torch.ones_like(input_ids)
            expected = _greedy(model, tokens, input_ids=input_ids, attention_mask=mask,
                               pixel_values=torch.from_numpy(pixels))
            with torch.no_grad():
                embeds = model.get_input_embeddings()(input_ids).clone()
                embeds[input_ids == image_token] = torch.from_numpy(
                    onnx_features.reshape(-1, onnx_features.shape[-1])).to(embeds.dtype)
            got = _greedy(model, tokens, inputs_embeds=embeds, attention_mask=mask)
            if got != expected:
                raise ExportCheckError(f'{name}: first tokens with the ONNX features {got}, '
                                       f"with transformers' own {expected}")
            yield f'tokens {name}: the first {len(got)} greedy tokens agree {got}'


@exporter('qwen2-gguf-q8_0')
class Qwen2GgufQ8:
    """The Qwen2 language model (InternVL's) as a Q8_0 GGUF for llama.cpp (``gguf_export``)."""

    families = (InternVLFamily.info.key,)
    arch = 'qwen2'

    @classmethod
    def make(cls, model, folder, path):
        """Write the GGUF from the checkpoint's weights."""
        from vlm_ros_tools.gguf_export import export_text_gguf
        export_text_gguf(str(folder), str(path), arch=cls.arch, ftype='q8_0',
                         pre_tokenizer='qwen2', name=pathlib.Path(path).stem)

    @staticmethod
    def check(model, folder, path, samples, tokens, configuration=None):
        """Compare llama.cpp's first logits and greedy tokens with transformers'."""
        return _check_text_gguf(model, folder, path, samples, tokens, 'Q8_0')


@exporter('qwen2vl-gguf-q8_0')
class Qwen2VLGgufQ8(Qwen2GgufQ8):
    """
    The language model of Qwen2-VL / Qwen2.5-VL as a Q8_0 GGUF of architecture ``qwen2vl``.

    Q8_0 is the smallest type the project's GGUF writer makes that stays within the checks
    (its 4-bit type is q4_0, which loses more than llama.cpp's Q4_K_M); the M-RoPE sections
    come from ``config.json``. A text prompt checks it: its positions are equal on every
    M-RoPE axis, so llama.cpp and transformers place it alike.
    """

    families = (Qwen2VLFamily.info.key,)
    arch = 'qwen2vl'


def _check_text_gguf(model, folder, path, samples, tokens, quantization):
    """Yield what agrees between llama.cpp running ``path`` and transformers, text only."""
    import torch
    try:
        from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
        decoder = LlamaCppDecoder(str(path), n_ctx=512, kv_type='f32')
    except ImportError as exc:
        raise ExportCheckError(f'llama-cpp-python is needed to check the GGUF: {exc}') \
            from exc
    try:
        ids, _, _ = _prepare(folder, samples[0][1], with_image=False)
        input_ids = torch.from_numpy(ids[None])
        with torch.no_grad():
            ref = model(input_ids=input_ids).logits[0, -1].float().numpy()
        session, logits = decoder.start(ids)
        got = np.asarray(logits, dtype=np.float32).reshape(-1)[:ref.shape[0]]
        cosine = float(np.dot(got, ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
        if int(np.argmax(got)) != int(np.argmax(ref)) or cosine < LOGIT_COSINE:
            raise ExportCheckError(
                f'first logits: llama.cpp picks {int(np.argmax(got))}, transformers '
                f'{int(np.argmax(ref))}; cosine {cosine:.4f} (needs {LOGIT_COSINE})')
        yield (f'logits: llama.cpp and transformers pick token {int(np.argmax(ref))}, '
               f'cosine {cosine:.4f}')
        expected = _greedy(model, tokens, input_ids=input_ids,
                           attention_mask=torch.ones_like(input_ids))
        seq = [int(np.argmax(got))]
        while len(seq) < len(expected):
            seq.append(int(np.argmax(np.asarray(session.step([seq[-1]])).reshape(-1))))
        agree = 0
        while agree < len(expected) and seq[agree] == expected[agree]:
            agree += 1
        yield (f'tokens: {agree} of the first {len(expected)} greedy tokens agree '
               f'({quantization} against float32)')
    finally:
        decoder.close()


@exporter('qwen2vl-mmproj-f16')
class Qwen2VLMmprojF16:
    """
    The vision tower and merger of Qwen2-VL / Qwen2.5-VL as an f16 mmproj GGUF for libmtmd.

    Projector ``qwen2vl_merger`` or ``qwen2.5vl_merger`` after ``config.json``'s model type
    (``gguf_export.export_mmproj_gguf``). f16 rather than the writer's q8_0: the f16 one's
    distance from transformers is the one measured (``MMPROJ_F16_TOLERANCE``), and the
    vision tower is small beside the language model.
    """

    families = (Qwen2VLFamily.info.key,)
    ftype = 'f16'
    tolerance = MMPROJ_F16_TOLERANCE

    @classmethod
    def make(cls, model, folder, path):
        """Write the mmproj GGUF from the checkpoint's weights."""
        from vlm_ros_tools.gguf_export import export_mmproj_gguf
        export_mmproj_gguf(str(folder), str(path), ftype=cls.ftype)

    @classmethod
    def check(cls, model, folder, path, samples, tokens, configuration=None):
        """Compare libmtmd's image features with transformers' on each sample; yield lines."""
        try:
            from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
            from vlm_ros.engine.runtimes.mtmd import MtmdImageEncoder
        except ImportError as exc:
            raise ExportCheckError(f'llama-cpp-python is needed to check the mmproj: {exc}') \
                from exc
        from vlm_ros.engine.families import load_family
        family = load_family(folder)
        with _language_model(folder, configuration) as (language_model, origin):
            decoder = LlamaCppDecoder(str(language_model), n_ctx=512, kv_type='f32')
            encoder = None
            try:
                # The processor's token budget, as the engine passes it with a model folder.
                encoder = MtmdImageEncoder(str(path), decoder,
                                           image_tokens=family.image_token_bounds())
                yield (f'load: libmtmd runs the {encoder.projector_type} projector on '
                       f'{origin}')
                for name, rgb in samples:
                    yield cls._compare(model, family, encoder, name, rgb)
            finally:
                if encoder is not None:
                    encoder.close()
                decoder.close()

    @classmethod
    def _compare(cls, model, family, encoder, name, rgb):
        import torch
        from vlm_ros.engine.images import resize
        # Resized to the processor's own grid (sides multiples of patch x merge, within its
        # pixel budget): neither libmtmd nor the processor resizes it again, and libmtmd's
        # resize, whose rounding differs from the processor's, stays out of the comparison.
        plan = family.plan(rgb.shape[0], rgb.shape[1])
        aligned = resize(rgb, plan.height, plan.width, family.resample)
        inputs, _ = family.preprocess(aligned)
        laid_out = encoder.prepare(encoder.marker, [aligned])
        got = laid_out.features
        columns, rows = plan.grid_w // plan.merge_size, plan.grid_h // plan.merge_size
        if got is None or laid_out.grids != [(columns, rows)]:
            raise ExportCheckError(
                f'{name}: libmtmd laid the {plan.width}x{plan.height} image out as '
                f'{laid_out.grids} tokens (columns, rows), the processor as {(columns, rows)}')
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values=torch.from_numpy(inputs['pixel_values']),
                image_grid_thw=torch.from_numpy(inputs['image_grid_thw']))
        ref = _features_array(out)
        if ref.shape != got.shape:
            raise ExportCheckError(f'{name}: libmtmd gives features {got.shape}, transformers '
                                   f'{ref.shape}')
        diff = float(np.max(np.abs(got - ref)))
        scale = float(np.max(np.abs(ref))) or 1.0
        if diff > cls.tolerance * scale:
            raise ExportCheckError(
                f'{name}: image features differ from transformers by up to {diff:.3g} '
                f'(largest feature {scale:.3g}, tolerance {cls.tolerance:g} of it)')
        return (f'features {name}: {plan.width}x{plan.height}, {len(ref)} tokens, max '
                f'|libmtmd - transformers| {diff:.2g} of max |feature| {scale:.3g}')


def _features_array(out):
    """Return ``get_image_features``' result as float32 [tokens, hidden], whatever its form."""
    import torch
    if not torch.is_tensor(out) and not isinstance(out, (list, tuple)):
        out = out.pooler_output  # transformers 5: a model output, one tensor per image
    if isinstance(out, (list, tuple)):
        out = torch.cat([t.reshape(-1, t.shape[-1]) for t in out])
    return out.float().numpy().reshape(-1, out.shape[-1])


@contextlib.contextmanager
def _language_model(folder, configuration):
    """
    Yield the language model GGUF libmtmd binds an mmproj to, and where it came from.

    The configuration's own (``llm_model_name``, downloaded or exported before it), else a
    temporary Q8_0 export of the checkpoint's, deleted afterwards: the features do not
    depend on the language model's weights, only on its width.
    """
    folder = pathlib.Path(folder)
    name = str(configuration.params().get('llm_model_name') or '') if configuration else ''
    if name.endswith('.gguf') and (folder / name).is_file():
        yield folder / name, name
        return
    from vlm_ros_tools.gguf_export import export_text_gguf
    temporary = folder / transfer.PART_DIR / 'export' / 'language-model.gguf'
    temporary.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_text_gguf(str(folder), str(temporary), arch='qwen2vl', ftype='q8_0',
                         pre_tokenizer='qwen2')
        yield temporary, "a temporary Q8_0 GGUF of the checkpoint's language model"
    finally:
        if temporary.exists():
            temporary.unlink()
