"""
The one resolver: from what a user names to a ``ModelSpec`` of checked files and runtimes.

Users name a model folder, file names relative to it, an ONNX precision variant and a family
(the node's parameters, ``vlm_ros.pipeline`` arguments, ``vlm_ask`` options), or a remote
server. ``resolve`` turns those into a spec -- the family, the runtime of each stage, the
resolved files and a label for logs -- checking everything that can be checked without
loading a model (files present and readable, a known family that matches the config, an
mmproj whose projector fits it). ``loader.build`` then creates the sessions from the spec;
the node resolves at configure and builds at activate.

Runtime choice follows the files: an ONNX decoder runs in ONNX Runtime, a ``.gguf`` decoder
in llama.cpp; an ONNX vision encoder feeds either, while an mmproj ``.gguf`` vision model
lets llama.cpp's own projector (libmtmd) encode the images.
"""

from dataclasses import dataclass
import os
import pathlib
from typing import Optional

from vlm_ros.engine import model_files
from vlm_ros.engine.errors import ModelFilesError, UnsupportedModelError
from vlm_ros.engine.families import registry

RUNTIME_ONNX = 'onnxruntime'
RUNTIME_LLAMACPP = 'llama.cpp'
RUNTIME_MTMD = 'llama.cpp mtmd'
RUNTIME_REMOTE = 'remote'


@dataclass(frozen=True)
class RemoteSettings:
    """An OpenAI-compatible server and how to talk to it (see ``remote.RemoteClient``)."""

    url: str
    model: str
    api_key_env: str = ''
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_retries: int = 2
    image_max_side: int = 1024
    box_format: str = 'normalized_1000'
    """How the served model writes boxes (``engine.grounding.BOX_FORMATS``)."""
    image_format: str = 'jpeg'
    """How images travel: ``jpeg`` or ``png`` (lossless)."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the family, each stage's runtime and file, and a label."""

    family: str
    """Family key (``registry.by_key``); '' for a remote server."""
    model_dir: Optional[pathlib.Path] = None
    """Folder with config and tokenizer files; None for GGUF + mmproj or a server."""
    vision: Optional[pathlib.Path] = None
    vision_runtime: str = ''
    decoder: Optional[pathlib.Path] = None
    decoder_runtime: str = ''
    embed: Optional[pathlib.Path] = None
    """The ONNX token embedder beside an ONNX decoder."""
    remote: Optional[RemoteSettings] = None
    label: str = ''
    """What the model says of itself for logs (the embedded demo model's ``vlm_ros.json``)."""

    @property
    def is_remote(self):
        """Whether a server answers instead of a local model."""
        return self.remote is not None

    def describe(self) -> str:
        """One line for logs (never the API key, only the name of its variable)."""
        if self.remote is not None:
            r = self.remote
            key = f', API key from ${r.api_key_env}' if r.api_key_env else ', no API key'
            return f'remote backend at {r.url}: model {r.model!r}{key}'
        tag = f' [{self.label}]' if self.label else ''
        where = f' in {self.model_dir}' if self.model_dir is not None else ''
        return (f'{self.family}{where}{tag}: vision={self.vision.name} '
                f'({self.vision_runtime}), decoder={self.decoder.name} ({self.decoder_runtime})')


def _path(base, value) -> pathlib.Path:
    # Absolute, so that files found relative to the folder are not joined to it twice.
    path = pathlib.Path(os.path.expanduser(os.fspath(value)))
    if not path.is_absolute() and base is not None:
        path = pathlib.Path(base) / path
    return path.absolute()


def resolve(model_dir=None, *, vision_model=None, decoder_model=None, embed_model=None,
            variant='fp32', model_type=None, base_dir=None, default_dir=None,
            roles=('vision_model', 'decoder_model')) -> ModelSpec:
    """
    Resolve a local model; raise ModelFilesError / UnsupportedModelError naming the problem.

    ``model_dir`` holds the config and tokenizer files; ``vision_model`` / ``decoder_model``
    / ``embed_model`` are resolved against it (default: ``onnx/{vision_encoder,
    decoder_model_merged}{_variant}.onnx``). Without ``model_dir``: an mmproj GGUF needs no
    folder (the GGUFs carry tokenizer and template), other files find ``config.json`` in
    their own folder or its parent. Relative paths without ``model_dir`` resolve against
    ``base_dir`` (default: the working directory). With nothing named at all,
    ``default_dir`` is used. ``model_type`` is a family key (``registry``); given, it must
    match the files; None: the files decide. ``roles`` names the vision and decoder settings
    in errors (the node passes its parameter names).
    """
    vision_role, decoder_role = roles
    if model_type is not None:
        registry.by_key(model_type)  # an unknown key fails here, naming the known ones
    if not (model_dir or vision_model or decoder_model):
        if default_dir is None:
            raise ModelFilesError('no model given: name a model folder (model_dir) or its files')
        model_dir = default_dir
        if not (pathlib.Path(model_dir) / 'config.json').is_file():
            raise ModelFilesError(f'the default model is missing from {model_dir}')
    if model_dir:
        model_dir = _path(base_dir, model_dir)
        if not model_dir.is_dir():
            raise ModelFilesError(f'model_dir {model_dir} is not a folder')
    if str(vision_model or '').endswith('.gguf'):
        return _resolve_mmproj(model_dir, base_dir, vision_model, decoder_model, model_type,
                               roles)
    if not model_dir:
        first = _path(base_dir, vision_model or decoder_model)
        model_dir = model_files.find_model_dir(first)
        if model_dir is None:
            raise ModelFilesError(f'no config.json beside {first} or in its parent folder; '
                                  "name the folder with the model's configs (model_dir)")
    family = _family_of_dir(model_dir, model_type)
    suffix = model_files.variant_suffix(variant)
    vision = model_files.resolve(model_dir, vision_model or f'onnx/vision_encoder{suffix}.onnx')
    decoder = model_files.resolve(model_dir,
                                  decoder_model or f'onnx/decoder_model_merged{suffix}.onnx')
    for role, path in ((vision_role, vision), (decoder_role, decoder)):
        if path.suffix not in ('.onnx', '.gguf'):
            raise UnsupportedModelError(f'{role} {path} is neither .onnx nor .gguf')
    if vision.suffix != '.onnx':
        raise UnsupportedModelError(f'{vision_role} {vision.name}: a .gguf vision model must be '
                                    'an mmproj projector')
    if not (model_dir / 'tokenizer.json').is_file():
        raise ModelFilesError(f'tokenizer.json not found in {model_dir}')
    embed = None
    if decoder.suffix == '.onnx':
        embed = model_files.onnx_files(model_dir, variant, vision, decoder, embed_model).embed
    label = model_files.load_json(model_dir, 'vlm_ros.json', required=False).get('label', '')
    return ModelSpec(family, model_dir, vision, RUNTIME_ONNX, decoder,
                     RUNTIME_LLAMACPP if decoder.suffix == '.gguf' else RUNTIME_ONNX, embed,
                     label=str(label))


def _family_of_dir(model_dir, model_type):
    cls = registry.family_of_dir(model_dir)
    if model_type is not None and cls.info.key != model_type:
        wanted = registry.by_key(model_type).info
        config_type = model_files.load_json(model_dir, 'config.json').get('model_type')
        raise UnsupportedModelError(
            f'model_type {wanted.model_type_param} ({wanted.display_name}) but '
            f'{model_dir}/config.json describes a {config_type!r} model')
    return cls.info.key


def _resolve_mmproj(model_dir, base_dir, vision_model, decoder_model, model_type, roles):
    """GGUF language model + mmproj projector: libmtmd encodes the images."""
    from vlm_ros.engine.gguf_file import read_metadata
    vision_role, decoder_role = roles
    mmproj = model_files.resolve(model_dir or base_dir or '.', vision_model)
    if not str(decoder_model or '').endswith('.gguf'):
        raise UnsupportedModelError(f'{vision_role} {mmproj.name} is an mmproj GGUF, so '
                                    f'{decoder_role} must be a GGUF language model too')
    base = model_dir or base_dir or '.'
    if not model_dir and not _path(base, decoder_model).is_file():
        base = mmproj.parent  # beside the projector, as the releases ship them
    decoder = model_files.resolve(base, decoder_model)
    meta = read_metadata(mmproj, ('general.architecture', 'clip.projector_type'))
    if meta.get('general.architecture') != 'clip':
        raise UnsupportedModelError(f'{vision_role} {mmproj} is not an mmproj (architecture '
                                    f'{meta.get("general.architecture")!r})')
    projector = str(meta.get('clip.projector_type') or '')
    if model_type is not None:
        info = registry.by_key(model_type).info
        if projector and projector not in info.mmproj_projectors:
            raise UnsupportedModelError(
                f'{mmproj.name} has a {projector!r} projector; {info.display_name} needs one '
                f'of {info.mmproj_projectors}')
    else:
        cls = registry.by_projector(projector)
        if cls is None:
            raise UnsupportedModelError(
                f'{mmproj.name} has a {projector!r} projector, which no supported family uses '
                f'(known: {sorted(p for i in registry.infos() for p in i.mmproj_projectors)})')
        info = cls.info
    return ModelSpec(info.key, model_dir or None, mmproj, RUNTIME_MTMD, decoder,
                     RUNTIME_LLAMACPP)


def resolve_remote(url, model, api_key_env='', **settings) -> ModelSpec:
    """Check a server's settings (RemoteConfigError naming the bad one) and return its spec."""
    from vlm_ros.engine.remote import check_remote_settings
    url = check_remote_settings(url, model, api_key_env)
    return ModelSpec('', remote=RemoteSettings(url, str(model).strip(), api_key_env,
                                               **settings))
