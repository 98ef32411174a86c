"""
The layering the README describes, checked on the sources: imports only run down the layers.

engine (no rclpy, no torch) <- ros adapter; inside the engine, families and runtimes never
import the pipeline or the loader, families import no runtime, and what identifies a family
lives in its own module, collected by the registry.
"""

import ast
import pathlib

from vlm_ros.engine.families import registry

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'vlm_ros'
ENGINE = PACKAGE / 'engine'


def _imports(path):
    """Return every module a source file imports (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names


def _sources(folder):
    return sorted(folder.rglob('*.py'))


def _offenders(folder, forbidden):
    """Map each source file under ``folder`` to the forbidden modules it imports."""
    def bad(name):
        return any(name == f or name.startswith(f + '.') for f in forbidden)
    found = {str(p.relative_to(PACKAGE)): sorted(filter(bad, _imports(p)))
             for p in _sources(folder)}
    return {path: names for path, names in found.items() if names}


def test_engine_imports_no_ros_and_no_torch():
    assert _offenders(ENGINE, ('rclpy', 'torch', 'transformers', 'vlm_ros.ros')) == {}


def test_families_and_runtimes_do_not_import_the_pipeline():
    upward = ('vlm_ros.engine.pipeline', 'vlm_ros.engine.loader', 'vlm_ros.engine.remote',
              'vlm_ros.engine.answerer')
    assert _offenders(ENGINE / 'families', upward) == {}
    assert _offenders(ENGINE / 'runtimes', upward) == {}


def test_families_import_no_runtime():
    assert _offenders(ENGINE / 'families', ('vlm_ros.engine.runtimes',)) == {}


def test_family_names_live_in_their_family_modules():
    """Keys and config model types appear as literals nowhere but in engine/families/."""
    infos = registry.infos()
    projectors = {p for i in infos for p in i.mmproj_projectors}  # libmtmd's own names
    names = {i.key for i in infos} | {t for i in infos for t in i.config_model_types}
    names -= projectors
    found = {}
    for path in _sources(PACKAGE):
        if ENGINE / 'families' in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.setdefault(str(path.relative_to(PACKAGE)), []).append(node.value)
    assert found == {}


def test_every_family_module_is_registered_and_distinct():
    infos = registry.infos()
    assert [i.key for i in infos] == ['internvl', 'smolvlm', 'qwen2_vl']
    assert [i.model_type_param for i in infos] == [0, 1, 2]
    assert registry.default().info.key == 'smolvlm'
    assert registry.by_config_type('idefics3').info.key == 'smolvlm'
    assert registry.by_config_type('qwen2_5_vl').info.key == 'qwen2_vl'
    assert registry.by_projector('internvl').info.key == 'internvl'
    assert registry.by_projector('qwen2.5vl_merger').info.key == 'qwen2_vl'
    assert registry.by_config_type('llava') is None
    assert registry.param_help() == \
        '0: InternVL2.5/3; 1: SmolVLM/SmolVLM2; 2: Qwen2-VL/Qwen2.5-VL'


def test_checkpoint_variants_stay_one_family():
    """What ``info_for`` declares per checkpoint names the family as the registry does."""
    for cls in registry.families():
        info = cls.info
        for source in info.config_model_types + info.mmproj_projectors:
            variant = cls.info_for(source)
            assert (variant.key, variant.model_type_param, variant.display_name,
                    variant.config_model_types, variant.mmproj_projectors, variant.default) \
                == (info.key, info.model_type_param, info.display_name,
                    info.config_model_types, info.mmproj_projectors, info.default), source
