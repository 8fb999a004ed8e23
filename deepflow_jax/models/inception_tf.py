"""Reads the 2015 Inception TF graph (``classify_image_graph_def.pb``) without TensorFlow.

The ADM evaluation suite downloads ``classify_image_graph_def.pb`` (from the
``inception-2015-12-05`` release) and runs it. Its weights are ``Const`` nodes
of a serialized ``GraphDef``; this module parses the file with the GraphDef
protobuf classes that tensorboardX ships (same field numbers as TensorFlow's), so
neither TensorFlow nor any extra package is needed, and returns the weights in
pytorch-fid's state_dict layout for :func:`deepflow_jax.models.inception.
params_from_state_dict`.

Node names, per conv scope ``S`` (e.g. ``mixed_6/conv``):

* ``S/conv2d_params``: the kernel, HWIO (-> torch OIHW, ``permute(3, 2, 0, 1)``);
* ``S/batchnorm/{gamma, beta, moving_mean, moving_variance}`` -> ``bn.{weight,
  bias, running_mean, running_var}``; the node ``S/batchnorm`` is a
  ``BatchNormWithGlobalNormalization`` op. When its ``scale_after_normalization``
  attribute is false TensorFlow does not multiply by gamma, so the scale is set
  to ones (in the released graph every gamma is 1, so both readings agree); its
  ``variance_epsilon`` must be the 1e-3 the network uses;
* ``softmax/weights`` ``(2048, 1008)`` -> ``fc.weight`` (transposed),
  ``softmax/biases`` -> ``fc.bias``.

Scopes map to pytorch-fid modules as in :data:`TF_SCOPES`: ``conv``, ``conv_1``
.. ``conv_4`` are the stem convs, ``mixed``, ``mixed_1``, ``mixed_2`` are
``Mixed_5b/5c/5d``, ``mixed_3`` is ``Mixed_6a``, ``mixed_4`` .. ``mixed_7`` are
``Mixed_6b`` .. ``Mixed_6e``, ``mixed_8`` is ``Mixed_7a`` and ``mixed_9``/
``mixed_10`` are ``Mixed_7b``/``Mixed_7c``. Inside a block ``conv`` is the 1x1
branch, ``tower``/``tower_1`` the multi-conv branches (their convs ``conv``,
``conv_1``, ...; ``mixed/conv`` and ``mixed/conv_1`` the split 1x3 / 3x1 pair of
the E blocks) and ``tower_2`` the pool branch.
"""
from __future__ import annotations

import os

import numpy as np
from google.protobuf.message import DecodeError
from tensorboardX.proto import graph_pb2
from tensorboardX.proto import types_pb2

from deepflow_jax.torch_io import ConversionError

BN_EPS = 1e-3

# Branch scopes inside each block type -> torchvision branch module names.
_BLOCK_A = {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
            "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
            "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1",
            "tower/conv_1": "branch3x3dbl_2", "tower/conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower_2/conv": "branch_pool",
            **{f"tower/conv{s}": f"branch7x7_{i + 1}" for i, s in enumerate(("", "_1", "_2"))},
            **{f"tower_1/conv{s}": f"branch7x7dbl_{i + 1}"
               for i, s in enumerate(("", "_1", "_2", "_3", "_4"))}}
_BLOCK_D = {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
            **{f"tower_1/conv{s}": f"branch7x7x3_{i + 1}"
               for i, s in enumerate(("", "_1", "_2", "_3"))}}
_BLOCK_E = {"conv": "branch1x1", "tower/conv": "branch3x3_1",
            "tower/mixed/conv": "branch3x3_2a", "tower/mixed/conv_1": "branch3x3_2b",
            "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
            "tower_1/mixed/conv": "branch3x3dbl_3a", "tower_1/mixed/conv_1": "branch3x3dbl_3b",
            "tower_2/conv": "branch_pool"}
_BLOCKS = (("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A),
           ("mixed_2", "Mixed_5d", _BLOCK_A), ("mixed_3", "Mixed_6a", _BLOCK_B),
           ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C),
           ("mixed_8", "Mixed_7a", _BLOCK_D), ("mixed_9", "Mixed_7b", _BLOCK_E),
           ("mixed_10", "Mixed_7c", _BLOCK_E))
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}

# TF conv scope -> pytorch-fid module prefix (94 conv layers).
TF_SCOPES: dict[str, str] = {
    **_STEM,
    **{f"{tf}/{scope}": f"{pt}.{branch}"
       for tf, pt, table in _BLOCKS for scope, branch in table.items()},
}

_BN_LEAVES = (("gamma", "bn.weight"), ("beta", "bn.bias"), ("moving_mean", "bn.running_mean"),
              ("moving_variance", "bn.running_var"))

_NP_DTYPES = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
              types_pb2.DT_HALF: np.float16, types_pb2.DT_INT32: np.int32,
              types_pb2.DT_INT64: np.int64}
_VALUE_FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                 types_pb2.DT_HALF: "half_val", types_pb2.DT_INT32: "int_val",
                 types_pb2.DT_INT64: "int64_val"}


def read_graph_def(path: str) -> graph_pb2.GraphDef:
  """Parses a binary ``GraphDef`` file; one ``ConversionError`` line if it is not one."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file (expected the TF graph "
                          "classify_image_graph_def.pb)")
  with open(path, "rb") as f:
    data = f.read()
  graph = graph_pb2.GraphDef()
  try:
    graph.ParseFromString(data)
  except (DecodeError, RuntimeError, ValueError) as e:
    raise ConversionError(f"{path}: not a binary TensorFlow GraphDef ({type(e).__name__}); "
                          "expected classify_image_graph_def.pb") from e
  return graph


def tensor_to_numpy(tensor, name: str = "tensor") -> np.ndarray:
  """A ``TensorProto`` -> numpy array (``tensor_content`` bytes or the typed ``*_val`` list).

  As TensorFlow does, a value list shorter than the shape is padded with its
  last value (a single value fills the tensor).
  """
  dtype = _NP_DTYPES.get(tensor.dtype)
  if dtype is None:
    raise ConversionError(f"{name}: tensor dtype {types_pb2.DataType.Name(tensor.dtype)} "
                          "is not supported")
  shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
  size = int(np.prod(shape, dtype=np.int64))
  if tensor.tensor_content:
    flat = np.frombuffer(tensor.tensor_content, dtype=np.dtype(dtype).newbyteorder("<"))
    if flat.size != size:
      raise ConversionError(f"{name}: {flat.size} values for shape {shape}")
    return flat.astype(dtype).reshape(shape)
  values = getattr(tensor, _VALUE_FIELDS[tensor.dtype])
  if tensor.dtype == types_pb2.DT_HALF:  # half_val holds the raw 16-bit patterns
    flat = np.asarray(values, np.uint16).view(np.float16)
  else:
    flat = np.asarray(values, dtype)
  if flat.size > size:
    raise ConversionError(f"{name}: {flat.size} values for shape {shape}")
  if flat.size < size:
    fill = flat[-1] if flat.size else dtype(0)
    flat = np.concatenate([flat, np.full(size - flat.size, fill, dtype)])
  return flat.reshape(shape)


def fid_inception_state_dict(path: str) -> dict[str, np.ndarray]:
  """The Inception graph's weights in pytorch-fid's layout: 472 float32 arrays.

  Raises one ``ConversionError`` line listing the missing nodes if ``path`` is
  not the 2015 Inception graph, or if a batch norm uses another epsilon.
  """
  path = os.fspath(path)
  graph = read_graph_def(path)
  nodes = {n.name: n for n in graph.node}

  def const(name):
    node = nodes.get(name)
    if node is None or node.op != "Const" or "value" not in node.attr:
      return None
    return tensor_to_numpy(node.attr["value"].tensor, f"{path}: node {name}")

  wanted = [f"{s}/conv2d_params" for s in TF_SCOPES]
  wanted += [f"{s}/batchnorm/{leaf}" for s in TF_SCOPES for leaf, _ in _BN_LEAVES]
  wanted += ["softmax/weights", "softmax/biases"]
  missing = [n for n in wanted
             if n not in nodes or nodes[n].op != "Const" or "value" not in nodes[n].attr]
  if missing:
    more = f", ... ({len(missing) - 6} more)" if len(missing) > 6 else ""
    raise ConversionError(
        f"{path}: not the 2015 Inception graph (classify_image_graph_def.pb): "
        f"{len(missing)} of its {len(wanted)} weight nodes missing: "
        f"{', '.join(missing[:6])}{more}")

  out: dict[str, np.ndarray] = {}
  for scope, module in TF_SCOPES.items():
    out[f"{module}.conv.weight"] = _float32(const(f"{scope}/conv2d_params")).transpose(3, 2, 0, 1)
    for leaf, key in _BN_LEAVES:
      out[f"{module}.{key}"] = _float32(const(f"{scope}/batchnorm/{leaf}"))
    bn = nodes.get(f"{scope}/batchnorm")
    if bn is not None and bn.op == "BatchNormWithGlobalNormalization":
      if "variance_epsilon" in bn.attr:
        eps = bn.attr["variance_epsilon"].f
        if abs(eps - BN_EPS) > 1e-9:
          raise ConversionError(f"{path}: {scope}/batchnorm has variance_epsilon {eps}, "
                                f"expected {BN_EPS}")
      if "scale_after_normalization" in bn.attr and not bn.attr["scale_after_normalization"].b:
        # TensorFlow ignores gamma here: the op computes (x - mean) / sqrt(var + eps) + beta.
        out[f"{module}.bn.weight"] = np.ones_like(out[f"{module}.bn.weight"])
  out["fc.weight"] = _float32(const("softmax/weights")).T
  out["fc.bias"] = _float32(const("softmax/biases"))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _float32(a: np.ndarray) -> np.ndarray:
  return a if a.dtype == np.float32 else a.astype(np.float32)
