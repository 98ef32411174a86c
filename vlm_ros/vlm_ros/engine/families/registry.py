"""
The one table of model families, built from the ``FamilyInfo`` each family class declares.

Every module of this package is imported once and its registered classes (those with an
``info``) collected, so a new family is one new module: the node's ``model_type`` parameter,
the model resolver and the GGUF chat path all read this registry.
"""

import functools
import importlib
import pkgutil
from typing import Dict, Optional, Tuple, Type

from vlm_ros.engine.errors import UnsupportedModelError
from vlm_ros.engine.families import base
from vlm_ros.engine.model_files import load_json


@functools.lru_cache(maxsize=1)
def families() -> Tuple[Type[base.ModelFamily], ...]:
    """Return every registered family class, ordered by its ``model_type`` parameter value."""
    package = importlib.import_module('vlm_ros.engine.families')
    found: Dict[str, Type[base.ModelFamily]] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f'{package.__name__}.{module_info.name}')
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, base.ModelFamily) and \
                    value.__module__ == module.__name__ and \
                    isinstance(value.__dict__.get('info'), base.FamilyInfo):
                found[value.__qualname__] = value
    classes = tuple(sorted(found.values(), key=lambda c: c.info.model_type_param))
    _check_unique(classes)
    return classes


def _check_unique(classes):
    """Two families claiming one name is a programming error: fail loudly at import."""
    defaults = [cls.__name__ for cls in classes if cls.info.default]
    if len(defaults) != 1:
        raise RuntimeError(f'exactly one family must be the default, got {defaults}')
    seen = {}
    for cls in classes:
        info = cls.info
        names = [('key', info.key), ('model_type_param', info.model_type_param)]
        names += [('config model_type', t) for t in info.config_model_types]
        names += [('projector', p) for p in info.mmproj_projectors]
        for name in names:
            if name in seen:
                raise RuntimeError(f'families {seen[name].__name__} and {cls.__name__} both '
                                   f'claim {name[0]} {name[1]!r}')
            seen[name] = cls


def infos() -> Tuple[base.FamilyInfo, ...]:
    """Return the declarations of every registered family."""
    return tuple(cls.info for cls in families())


def default() -> Type[base.ModelFamily]:
    """Return the family of the embedded default model."""
    return next(cls for cls in families() if cls.info.default)


def _find(predicate) -> Optional[Type[base.ModelFamily]]:
    return next((cls for cls in families() if predicate(cls.info)), None)


def by_key(key: str) -> Type[base.ModelFamily]:
    """Return the family class named ``key`` (e.g. ``smolvlm``)."""
    cls = _find(lambda info: info.key == key)
    if cls is None:
        raise UnsupportedModelError(f'unknown model family {key!r}; known: '
                                    f'{[i.key for i in infos()]}')
    return cls


def by_param(value: int) -> Type[base.ModelFamily]:
    """Return the family class for a value of the node's ``model_type`` parameter."""
    cls = _find(lambda info: info.model_type_param == value)
    if cls is None:
        raise UnsupportedModelError(f'model_type {value} names no family; {param_help()}')
    return cls


def by_config_type(model_type: str) -> Optional[Type[base.ModelFamily]]:
    """Return the family class that reads a ``config.json`` of this ``model_type``, or None."""
    return _find(lambda info: model_type in info.config_model_types)


def by_projector(projector: str) -> Optional[Type[base.ModelFamily]]:
    """Return the family class whose mmproj GGUFs have this ``clip.projector_type``, or None."""
    return _find(lambda info: projector in info.mmproj_projectors)


def param_help() -> str:
    """'0: InternVL2.5/3; 1: SmolVLM/SmolVLM2' for the ``model_type`` parameter."""
    return '; '.join(f'{i.model_type_param}: {i.display_name}' for i in infos())


def family_of_dir(model_dir) -> Type[base.ModelFamily]:
    """Return the family class that reads ``model_dir/config.json``."""
    model_type = load_json(model_dir, 'config.json').get('model_type', '')
    cls = by_config_type(model_type)
    if cls is None:
        known = sorted(t for i in infos() for t in i.config_model_types)
        raise UnsupportedModelError(
            f'{model_dir}/config.json has model_type {model_type!r}; supported: {known}')
    return cls


def load_family(model_dir, **kwargs) -> base.ModelFamily:
    """Instantiate the family that ``model_dir/config.json`` names."""
    return family_of_dir(model_dir)(model_dir, **kwargs)
