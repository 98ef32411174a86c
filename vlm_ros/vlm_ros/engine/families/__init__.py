"""Model families: preprocessing, prompt layout, chat template and special tokens."""

from vlm_ros.engine.errors import UnsupportedModelError
from vlm_ros.engine.model_files import load_json

# config.json model_type -> family module and class; imported on demand.
_FAMILIES = {
    'smolvlm': ('idefics3', 'Idefics3Family'),
    'idefics3': ('idefics3', 'Idefics3Family'),
    'internvl': ('internvl', 'InternVLFamily'),
    'internvl_chat': ('internvl', 'InternVLFamily'),
}


def load_family(model_dir, **kwargs):
    """Instantiate the family that ``model_dir/config.json`` names."""
    model_type = load_json(model_dir, 'config.json').get('model_type', '')
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f'{model_dir}/config.json has model_type {model_type!r}; supported: '
            f'{sorted(_FAMILIES)}')
    module_name, class_name = _FAMILIES[model_type]
    module = __import__(f'vlm_ros.engine.families.{module_name}', fromlist=[class_name])
    return getattr(module, class_name)(model_dir, **kwargs)
