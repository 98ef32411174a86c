"""
Self-attention of an exported vision encoder as ONNX Runtime's fused MultiHeadAttention.

Exported SigLIP (SmolVLM) and InternViT (InternVL) graphs spell attention out: a MatMul
of queries and keys into scores [batch, heads, patches, patches], a scale, the mask, a
Softmax, a MatMul with the values. The scores of one layer of SmolVLM's encoder at 1024
patches take 48 MB in float32, and the Softmax writes as much again. ONNX Runtime's
``com.microsoft.MultiHeadAttention`` computes the same attention in blocks (flash attention
on CPU in recent releases) when it has no mask: SmolVLM2-256M's int8 encoder at 512 px on
2 cores used 117 MB of activations as exported, 54 MB fused.

The rewrite happens when the encoder is loaded and goes to ONNX Runtime through temporary
files, deleted once the session exists; the model's files stay as exported. The weights go
to their own file, tensor by tensor, so the graph is never in memory twice. (Handed over as
bytes, it was there four times while the session was created, as ONNX Runtime copies and
then parses them: loading SmolVLM2-256M's fp32 encoder peaked at 1,471 MB instead of 756.)
Each layer whose nodes have exactly the exported shape below is fused, any other is left
alone:

    Softmax(Add?(Mul?(MatMul(Transpose(Reshape(q), 0213), Transpose(Reshape(k), 0231)),
                      scale), mask))
    -> Cast* -> MatMul(., Transpose(Reshape(v), 0213)) -> Transpose(0213) -> Reshape

A mask is dropped, not fused, and only when it is computed from a graph input that marks
valid pixels (``pixel_attention_mask``; SmolVLM's export also reads ``pixel_values`` there,
to pick the frames that are not all padding): a frame whose pixels are all valid has no
padded patch, so its mask passes everything. ``Fused.mask_inputs`` names those inputs;
frames with padding must run on the exported graph (``OnnxVisionEncoder`` does so).

The ``onnx`` package reads and writes the graph (a well-kept library; ONNX Runtime has no
Python API for it). Without it, or for a graph with external data, nothing is fused.
"""

from dataclasses import dataclass
import logging
import os
import shutil
import tempfile
from typing import FrozenSet, Optional

_LOG = logging.getLogger('vlm_ros.onnx')
MASK_INPUTS = frozenset({'pixel_attention_mask'})
"""Graph inputs that mark valid pixels: masks computed from them may be dropped."""
_QUERY_PERM, _KEY_PERM = [0, 2, 1, 3], [0, 2, 3, 1]


@dataclass
class Fused:
    """A rewritten graph, in temporary files for ``InferenceSession``."""

    path: str
    """The graph (its weights beside it); whoever creates the session deletes them."""
    layers: int
    """Attention layers fused."""
    mask_inputs: FrozenSet[str]
    """Graph inputs a dropped mask came from: frames with a False in them need the export."""

    def remove(self):
        """Delete the temporary files (once the session has read them)."""
        if self.path:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
            self.path = ''


def fuse_file(path, num_heads: int, hidden_size: int) -> Optional[Fused]:
    """
    Return ``path`` with its attention layers fused, or None when none could be.

    ``num_heads`` and ``hidden_size`` are the encoder's, from the model's config: a layer
    whose reshapes say otherwise is not fused.
    """
    if not _head_size(num_heads, hidden_size):
        return None  # before reading the graph: without the config's shapes nothing fuses
    try:
        import onnx
    except ImportError:
        _LOG.debug('onnx is not installed: %s runs as exported', os.path.basename(path))
        return None
    model = onnx.load(os.fspath(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return None  # its weights live beside it, where a copy elsewhere would not look
    layers, masks = fuse(model, num_heads, hidden_size)
    if not layers:
        return None
    fused = Fused(os.path.join(tempfile.mkdtemp(prefix='vlm_ros_fused_'), 'graph.onnx'),
                  layers, frozenset(masks))
    try:
        # Each tensor is written out and cleared in turn, then the graph, now small.
        onnx.save_model(model, fused.path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location='weights.bin')
    except BaseException:
        fused.remove()
        raise
    return fused


def fuse(model, num_heads: int, hidden_size: int):
    """
    Fuse the attention layers of ``model`` (an ``onnx.ModelProto``) in place.

    Returns ``(layers fused, graph inputs the dropped masks came from)``.
    """
    from onnx import helper

    head_size = _head_size(num_heads, hidden_size)
    if not head_size:
        return 0, set()
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), 0)
    graph = _Graph(model.graph, num_heads, head_size, opset)
    replaced, masks = {}, set()
    for softmax in [n for n in model.graph.node if n.op_type == 'Softmax']:
        match = graph.match(softmax)
        if match is None:
            continue
        (query, key, value), scale, mask, last = match
        if mask is not None:
            sources = graph.input_ancestors(mask) & MASK_INPUTS
            if not sources:
                continue
            masks |= sources
        node = helper.make_node(
            'MultiHeadAttention', [query, key, value], [last.output[0]],
            name=f'{softmax.name}/fused_attention', domain='com.microsoft',
            num_heads=num_heads, scale=scale)
        replaced[id(last)] = node
    if not replaced:
        return 0, set()
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    graph.keep_live(nodes)
    if not any(o.domain == 'com.microsoft' for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid('com.microsoft', 1))
    return len(replaced), masks


class _Graph:
    """Producers, consumers and constants of a graph, and the pattern match on them."""

    def __init__(self, graph, num_heads, head_size, opset):
        from onnx import numpy_helper

        self.graph, self.num_heads, self.head_size = graph, num_heads, head_size
        # Softmax's default axis was 1 before opset 13 (over all trailing axes, flattened).
        self.default_axis = -1 if opset >= 13 else 1
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.inputs = {i.name for i in graph.input}
        self._initializers = {t.name: t for t in graph.initializer}
        self._to_array = numpy_helper.to_array

    def const(self, name):
        """Return the value of a constant tensor (initializer, Constant, Identity of one)."""
        if name in self._initializers:
            return self._to_array(self._initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == 'Identity':
            return self.const(node.input[0])
        if node.op_type == 'Constant' and node.attribute and node.attribute[0].name == 'value':
            return self._to_array(node.attribute[0].t)
        return None

    def _only(self, name, op_type):
        """Return the one consumer of ``name`` when it is an ``op_type`` node, else None."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def _made_by(self, name, op_type):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def _split_heads(self, transposed, perm):
        """Return the [batch, seq, hidden] tensor behind Transpose(Reshape(x), perm), or None."""
        transpose = self._made_by(transposed, 'Transpose')
        if transpose is None or _perm(transpose) != perm:
            return None
        reshape = self._made_by(transpose.input[0], 'Reshape')
        if reshape is None or not self._heads_shape(reshape.input[1]):
            return None
        return reshape.input[0]

    def _heads_shape(self, shape):
        """Tell whether ``shape`` is [batch, seq, heads, head size] as the config says."""
        value = self.const(shape)
        if value is not None:
            dims = [int(v) for v in value.reshape(-1)]
        else:  # Concat of per-axis pieces: the last two are constants
            concat = self._made_by(shape, 'Concat')
            if concat is None or len(concat.input) != 4:
                return False
            tail = [self.const(name) for name in concat.input[2:]]
            if any(v is None or v.size != 1 for v in tail):
                return False
            dims = [0, 0] + [int(v.reshape(-1)[0]) for v in tail]
        if len(dims) != 4:
            return False
        heads, size = dims[2], dims[3]
        return (heads, size) in ((self.num_heads, self.head_size), (-1, self.head_size),
                                 (self.num_heads, -1))

    def match(self, softmax):
        """Return ``((q, k, v), scale, mask or None, last Reshape)`` for one layer, or None."""
        if _axis(softmax, self.default_axis) not in (-1, 3):
            return None
        x, mask = self.producer.get(softmax.input[0]), None
        if x is not None and x.op_type == 'Add' and len(self.consumers[x.output[0]]) == 1:
            a, b = (self.producer.get(name) for name in x.input)
            scores_first = a is not None and a.op_type in ('Mul', 'MatMul')
            mask = x.input[1] if scores_first else x.input[0]
            x = a if scores_first else b
        scale = 1.0
        if x is not None and x.op_type == 'Mul' and len(self.consumers[x.output[0]]) == 1:
            for i, name in enumerate(x.input):
                value = self.const(name)
                if value is not None and value.size == 1:
                    scale, x = float(value.reshape(-1)[0]), self.producer.get(x.input[1 - i])
                    break
            else:
                return None
        if x is None or x.op_type != 'MatMul' or len(self.consumers[x.output[0]]) != 1:
            return None
        query = self._split_heads(x.input[0], _QUERY_PERM)
        key = self._split_heads(x.input[1], _KEY_PERM)
        probs = softmax.output[0]
        while True:  # exporters may cast the probabilities back and forth
            cast = self._only(probs, 'Cast')
            if cast is None:
                break
            probs = cast.output[0]
        weighted = self._only(probs, 'MatMul')
        if query is None or key is None or weighted is None or weighted.input[0] != probs:
            return None
        value = self._split_heads(weighted.input[1], _QUERY_PERM)
        merge = self._only(weighted.output[0], 'Transpose')
        if value is None or merge is None or _perm(merge) != _QUERY_PERM:
            return None
        last = self._only(merge.output[0], 'Reshape')
        if last is None:
            return None
        return (query, key, value), scale, mask, last

    def input_ancestors(self, name):
        """Return the graph inputs ``name`` is computed from."""
        found, todo, seen = set(), [name], set()
        while todo:
            name = todo.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in self.inputs:
                found.add(name)
            node = self.producer.get(name)
            if node is not None:
                todo.extend(node.input)
        return found

    def keep_live(self, nodes):
        """Set the graph's nodes to ``nodes`` less those no output needs; drop dead weights."""
        live = {o.name for o in self.graph.output}
        kept = []
        for node in reversed(nodes):
            if any(o in live for o in node.output):
                kept.append(node)
                live.update(name for name in node.input if name)
        kept.reverse()
        del self.graph.node[:]
        self.graph.node.extend(kept)
        weights = self.graph.initializer
        for i in reversed(range(len(weights))):  # in place: extend() would copy every weight
            if weights[i].name not in live:
                del weights[i]


def _head_size(num_heads, hidden_size):
    """Return the size of one head, 0 when the config's shapes cannot be a split in heads."""
    if num_heads <= 0 or hidden_size <= 0 or hidden_size % num_heads:
        return 0
    return hidden_size // num_heads


def _perm(node):
    return next((list(a.ints) for a in node.attribute if a.name == 'perm'), None)


def _axis(node, default):
    return next((a.i for a in node.attribute if a.name == 'axis'), default)
