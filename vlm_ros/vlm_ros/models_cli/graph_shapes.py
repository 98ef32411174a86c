"""
The sizes a model file declares, read without running it.

ONNX graph inputs and outputs, and GGUF header values.

``verify`` compares them with ``config.json``: a vision encoder whose features are not as
wide as the language model, or a decoder with another layer count, is the wrong file even
when every checksum matches its own repository (two downloads mixed in one folder).
"""

from typing import Dict, List, Optional, Tuple, Union

from vlm_ros.engine.gguf_file import read_metadata

Shape = List[Union[int, str, None]]


def onnx_io(path) -> Tuple[Dict[str, Shape], Dict[str, Shape]]:
    """Return the ONNX graph's (inputs, outputs) as name -> shape (ints, or names if dynamic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Loading is all that is needed: skip the graph optimisations a session would run.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    inputs = {i.name: list(i.shape) for i in session.get_inputs()}
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    return inputs, outputs


def static(dim) -> Optional[int]:
    """Return a dimension's size when the graph fixes it, else None."""
    return dim if isinstance(dim, int) and dim > 0 else None


def gguf_values(path, names) -> Dict[str, object]:
    """Return GGUF header values; names may hold ``{arch}``, the file's architecture."""
    arch = read_metadata(path, ('general.architecture',)).get('general.architecture', '')
    values = read_metadata(path, tuple(n.format(arch=arch) for n in names))
    found = {name: values.get(name.format(arch=arch)) for name in names}
    found['general.architecture'] = arch
    return found
