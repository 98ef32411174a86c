"""
From node parameters to model files (checked at configure) and a pipeline (at activate).

Relative paths resolve against ``model_dir`` when it is set, otherwise against the package's
share directory; never against the working directory the node happened to start in. With
``backend:=remote`` no model file is read: configure checks the server settings and
activate creates the HTTP client of a ``RemoteRuntime`` instead of runtime sessions.
"""

from dataclasses import dataclass
import os
import pathlib
from typing import Optional, Union

from vlm_ros.engine import model_files
from vlm_ros.engine.errors import ModelFilesError, UnsupportedModelError
from vlm_ros.ros.params import MODEL_INTERNVL, MODEL_SMOLVLM

BACKEND_REMOTE = 'remote'

DEFAULT_MODEL = 'models/default'
FAMILY_OF_MODEL_TYPE = {MODEL_INTERNVL: ('internvl', 'internvl_chat'),
                        MODEL_SMOLVLM: ('smolvlm', 'idefics3')}
MMPROJ_PROJECTORS = {'smolvlm': ('idefics3',), 'internvl': ('internvl',)}
MODEL_TYPE_NAMES = {MODEL_INTERNVL: 'InternVL', MODEL_SMOLVLM: 'SmolVLM'}


def share_dir() -> pathlib.Path:
    """Return the installed share/vlm_ros folder (bundled model, sample image, configs)."""
    from ament_index_python.packages import get_package_share_directory
    return pathlib.Path(get_package_share_directory('vlm_ros'))


@dataclass
class ModelChoice:
    """The files a configured node will load on activate."""

    model_dir: pathlib.Path
    vision: pathlib.Path
    decoder: pathlib.Path
    model_type: str
    is_default: bool
    label: str = ''

    @property
    def runtime(self):
        """llama.cpp for a GGUF decoder, ONNX Runtime otherwise."""
        return 'llama.cpp' if self.decoder.suffix == '.gguf' else 'onnxruntime'

    def describe(self):
        """One line for logs."""
        tag = f' [{self.label}]' if self.label else ''
        return (f'{self.model_type} in {self.model_dir}{tag}: vision={self.vision.name}, '
                f'decoder={self.decoder.name} ({self.runtime})')


@dataclass
class RemoteChoice:
    """The OpenAI-compatible server a configured node will send requests to on activate."""

    url: str
    model: str
    api_key_env: str = ''
    label: str = ''
    is_default: bool = False
    runtime: str = 'remote'

    def describe(self):
        """One line for logs: backend, URL, model and the key's variable name (not the key)."""
        key = f', API key from ${self.api_key_env}' if self.api_key_env else ', no API key'
        return f'remote backend at {self.url}: model {self.model!r}{key}'


def _resolve(base: pathlib.Path, value: str) -> pathlib.Path:
    path = pathlib.Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def choose_model(cfg, share: Optional[pathlib.Path] = None) -> Union[ModelChoice, RemoteChoice]:
    """
    Resolve and check the model files named by the parameters in ``cfg``.

    Raises ModelFilesError / UnsupportedModelError naming the file and the reason. With
    ``backend`` remote, checks the server settings instead (RemoteConfigError) and returns a
    RemoteChoice; local model parameters are then ignored.
    """
    if cfg.get('backend') == BACKEND_REMOTE:
        from vlm_ros.engine.runtimes.remote import check_remote_settings
        url = check_remote_settings(cfg['remote_url'], cfg['remote_model'],
                                    cfg['remote_api_key_env'])
        return RemoteChoice(url, cfg['remote_model'].strip(), cfg['remote_api_key_env'])
    share = share or share_dir()
    vision_name, llm_name, dir_name = (cfg['model_file_name'], cfg['llm_model_name'],
                                       cfg['model_dir'])
    is_default = not (vision_name or llm_name or dir_name)
    if is_default:
        model_dir = share / DEFAULT_MODEL
        if not (model_dir / 'config.json').is_file():
            raise ModelFilesError(f'the embedded default model is missing from {model_dir}')
    elif dir_name:
        model_dir = _resolve(share, dir_name)
    elif vision_name.endswith('.gguf'):
        # llama.cpp multimodal GGUFs carry tokenizer and template: no config folder needed.
        model_dir = _resolve(share, vision_name).parent
    else:
        first = _resolve(share, vision_name or llm_name)
        found = model_files.find_model_dir(first)
        if found is None:
            raise ModelFilesError(f'no config.json beside {first} or in its parent folder; '
                                  "set model_dir to the folder with the model's configs")
        model_dir = found
    if not model_dir.is_dir():
        raise ModelFilesError(f'model_dir {model_dir} is not a folder')
    base = model_dir
    vision = _resolve(base, vision_name or 'onnx/vision_encoder.onnx')
    decoder = _resolve(base, llm_name or 'onnx/decoder_model_merged.onnx')
    for role, path in (('model_file_name', vision), ('llm_model_name', decoder)):
        model_files.resolve(base, path)  # exists and readable, or a ModelFilesError
        if path.suffix not in ('.onnx', '.gguf'):
            raise UnsupportedModelError(f'{role} {path} is neither .onnx nor .gguf')
    family_name = FAMILY_OF_MODEL_TYPE[cfg['model_type']][0]
    if vision.suffix == '.gguf':
        _check_mmproj(vision, decoder, family_name)
        return ModelChoice(model_dir, vision, decoder, family_name, is_default)
    config = model_files.load_json(model_dir, 'config.json')
    model_type = config.get('model_type', '')
    expected = FAMILY_OF_MODEL_TYPE[cfg['model_type']]
    if model_type not in expected:
        raise UnsupportedModelError(
            f'model_type {cfg["model_type"]} ({MODEL_TYPE_NAMES[cfg["model_type"]]}) but '
            f'{model_dir}/config.json describes a {model_type!r} model')
    if not (model_dir / 'tokenizer.json').is_file():
        raise ModelFilesError(f'tokenizer.json not found in {model_dir}')
    # A model may describe itself for logs (the embedded demo model says what it is).
    label = model_files.load_json(model_dir, 'vlm_ros.json', required=False).get('label', '')
    return ModelChoice(model_dir, vision, decoder, model_type, is_default, label)


def _check_mmproj(mmproj, decoder, family_name):
    """Check that an mmproj comes with a GGUF language model and fits the family."""
    from vlm_ros.engine.runtimes.gguf_file import read_metadata
    if decoder.suffix != '.gguf':
        raise UnsupportedModelError(f'model_file_name {mmproj.name} is an mmproj GGUF, so '
                                    'llm_model_name must be a GGUF language model too')
    meta = read_metadata(mmproj, ('general.architecture', 'clip.projector_type'))
    if meta.get('general.architecture') != 'clip':
        raise UnsupportedModelError(f'{mmproj} is not an mmproj (architecture '
                                    f'{meta.get("general.architecture")!r})')
    projector = str(meta.get('clip.projector_type') or '')
    wanted = MMPROJ_PROJECTORS[family_name]
    if projector and projector not in wanted:
        raise UnsupportedModelError(f'{mmproj.name} has a {projector!r} projector; '
                                    f'{family_name} needs one of {wanted}')


def load_pipeline(choice, cfg):
    """Create the runtime sessions for ``choice``, or the remote client (what activate does)."""
    if isinstance(choice, RemoteChoice):
        from vlm_ros.engine.runtimes.remote import RemoteRuntime
        return RemoteRuntime(choice.url, choice.model, api_key_env=choice.api_key_env,
                             connect_timeout_s=cfg['remote_connect_timeout_s'],
                             read_timeout_s=cfg['remote_read_timeout_s'],
                             max_retries=cfg['remote_max_retries'],
                             image_max_side=cfg['remote_image_max_side'])
    from vlm_ros.engine.pipeline import pipeline
    return pipeline(choice.model_dir, vision_model=choice.vision,
                    decoder_model=choice.decoder, n_threads=cfg['n_threads'],
                    n_ctx=cfg['n_ctx'], model_type=choice.model_type,
                    max_beams=max(4, cfg['num_beams']))
