"""FID Inception-v3 (deepflow_jax.models.inception) against pytorch-fid / the ADM graph.

Golden data: tests/data/fid_inception_tiny.{json,npz}, a subset of the project's
golden ``fid_inception_tiny`` set (pytorch-fid 0.3.0's FID Inception-v3 on torch
2.14.1 CPU, float32, random non-trivial weights; ADM arrays computed with the TF
graph's preprocessing, the TF1 resize verified bitwise against TensorFlow):

* the json holds the weight recipe: numpy ``default_rng(seed)``, one draw per key
  in manifest order, with each key's shape, rule, sum and abs-sum (checked, so a
  change of numpy's Generator stream fails with a clear message instead of as a
  parity failure). The 95 MB weights are rebuilt here, never stored;
* the npz keeps every output family whole (4 images) except the two 299x299
  network inputs (rows ``rows`` only: every 6th row plus the last two) and the
  large maps (channel subsets, indices stored beside them, with the full map's
  max |value| for the tolerance).

Tolerances (from the golden json's suggestions, justified by its float32 vs float64
measurements: torch float32 differs from float64 by <= 3.8e-6 on pool3, 1.1e-5 on
the spatial features; XLA's convolution order differs at the same level):
pool/logits atol 1e-4 rtol 1e-4; spatial atol 2e-4 rtol 1e-4; softmax atol 1e-6;
intermediate maps 1e-4 * max|map|; TF1 resize 1e-4 on the 0..255 scale (the
matrix form computes ``(1-f) a + f b`` where TF computes ``a + (b - a) f``: a few
float32 ulps of 255); torch-resize network input 1e-6 on [-1, 1].

Wall time: ~60 s on 2 shared CPU cores (two compilations of the full network, one
in an 8-device subprocess; ~100 MB weight files written a few times).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_env
from deepflow_jax.models import inception as inc
from deepflow_jax.models import inception_tf
from deepflow_jax.errors import UserError
from deepflow_jax.torch_io import ConversionError

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(DATA, "fid_inception_tiny.json")
NPZ = os.path.join(DATA, "fid_inception_tiny.npz")


def golden_state_dict() -> dict[str, np.ndarray]:
  """The golden network's 472 float32 tensors, rebuilt bit for bit from the json's recipe."""
  with open(JSON) as f:
    meta = json.load(f)
  rng = np.random.default_rng(meta["seed"])
  out = {}
  for e in meta["manifest"]:
    shape, rule = tuple(e["shape"]), e["init"]
    if rule.startswith("normal*sqrt("):  # "normal*sqrt(k/fan_in)", fan_in = prod(shape[1:])
      k = float(rule[len("normal*sqrt("):].split("/")[0])
      a = rng.standard_normal(shape) * np.sqrt(k / np.prod(shape[1:]))
    elif rule == "1+0.1*normal":
      a = 1 + 0.1 * rng.standard_normal(shape)
    elif rule == "0.1*normal":
      a = 0.1 * rng.standard_normal(shape)
    elif rule == "0.5+uniform01":
      a = 0.5 + rng.random(shape)
    else:
      raise AssertionError(f"unknown init rule {rule!r} in {JSON}")
    a = a.astype(np.float32)
    # The golden sums are float64 sums of these float32 arrays: equal up to summation order.
    got = (float(a.sum(dtype=np.float64)), float(np.abs(a).sum(dtype=np.float64)))
    if (abs(got[0] - e["sum"]) > 1e-9 * e["abs_sum"]
        or abs(got[1] - e["abs_sum"]) > 1e-9 * e["abs_sum"]):
      raise AssertionError(
          f"regenerated {e['key']} has sum/abs_sum {got}, the golden recipe recorded "
          f"({e['sum']}, {e['abs_sum']}): numpy's default_rng stream changed "
          f"(numpy {np.__version__}); the golden weights cannot be rebuilt")
    out[e["key"]] = a
  return out


@pytest.fixture(scope="module")
def z():
  return dict(np.load(NPZ))


@pytest.fixture(scope="module")
def state_dict():
  return golden_state_dict()


@pytest.fixture(scope="module")
def params(state_dict):
  return inc.params_from_state_dict(state_dict, "golden")


@pytest.fixture(scope="module")
def net_fn():
  """The network on preprocessed 299x299 input, with the sown maps: one compilation serves
  both preprocessings (the default in-model ADM path runs in the 8-device test)."""
  model = inc.FIDInception(preprocessing="none")
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))

  def run(params, x):
    out, state = fn(params, x)
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return jax.tree.map(np.asarray, out), inter

  return run


@pytest.fixture(scope="module")
def adm_path(net_fn, params, z):
  return net_fn(params, inc.preprocess(z["images_uint8_nhwc"], "adm"))


@pytest.fixture(scope="module")
def torch_path(net_fn, params, z):
  return net_fn(params, inc.preprocess(z["images_uint8_nhwc"], "pytorch_fid"))


def _close(got, ref, atol, rtol=0.0):
  np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------


def test_adm_tf1_resize_matches_tensorflow(z):
  got = np.asarray(inc.resize_tf1_bilinear(z["images_uint8_nhwc"].astype(np.float32)))
  assert got.shape == (4, 299, 299, 3) and got.dtype == np.float32
  # 1e-4 on the 0..255 scale: a few float32 ulps of 255 (see the module docstring).
  _close(got[:, z["rows"]], z["adm_input_tf1resize_nhwc_255_rows"], atol=1e-4)
  # ADM's normalisation on top: (x - 128) / 128.
  net_in = np.asarray(inc.preprocess(z["images_uint8_nhwc"], "adm"))
  np.testing.assert_array_equal(net_in, (got - 128) * np.float32(0.0078125))


def test_pytorch_fid_preprocessing_matches_torch(z):
  got = np.asarray(inc.preprocess(z["images_uint8_nhwc"], "pytorch_fid"))
  _close(got[:, z["rows"]], z["input_normalized_nhwc_rows"], atol=1e-6)  # [-1, 1] scale
  # The two preprocessings really differ (the golden json measured up to 1.14).
  adm = np.asarray(inc.preprocess(z["images_uint8_nhwc"], "adm"))
  assert np.abs(adm - got).max() > 0.5


@pytest.mark.parametrize("in_hw", [(64, 64), (299, 299), (37, 512), (600, 301)])
def test_resize_matrices_any_size(in_hw):
  """Up/down/identity: torch's resize against torch itself, TF1's against its formula."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (1,) + in_hw + (3,)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299),
                                        mode="bilinear", align_corners=False)
  got = np.asarray(inc.resize_torch_bilinear(x))
  _close(got, ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)  # 0..255 scale, float32 ulps

  def tf1_ref(img):  # TF1 ResizeBilinear, legacy grid, written out as TF's kernel computes it
    h, w = img.shape[:2]
    sy, sx = np.float32(h) / np.float32(299), np.float32(w) / np.float32(299)
    fy, fx = np.arange(299, dtype=np.float32) * sy, np.arange(299, dtype=np.float32) * sx
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (fy - y0)[:, None, None], (fx - x0)[None, :, None]
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * dx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * dx
    return top + (bottom - top) * dy

  _close(np.asarray(inc.resize_tf1_bilinear(x))[0], tf1_ref(x[0]), atol=1e-4)
  if in_hw == (299, 299):  # both are the identity at 299
    np.testing.assert_array_equal(np.asarray(inc.resize_tf1_bilinear(x)), x)
    np.testing.assert_array_equal(np.asarray(inc.resize_torch_bilinear(x)), x)


# ---------------------------------------------------------------------------
# Network parity.
# ---------------------------------------------------------------------------


def test_adm_features(adm_path, z):
  adm_out, _ = adm_path
  assert adm_out["pool"].shape == (4, 2048) and adm_out["pool"].dtype == np.float32
  assert adm_out["spatial"].shape == (4, 2023) and adm_out["logits"].shape == (4, 1008)
  _close(adm_out["pool"], z["adm_pool3"], atol=1e-4, rtol=1e-4)
  _close(adm_out["logits"], z["adm_logits_nobias"], atol=1e-4, rtol=1e-4)
  _close(adm_out["probs"], z["adm_softmax_nobias"], atol=1e-6)
  _close(adm_out["spatial"], z["adm_sfid_spatial_flat2023"], atol=2e-4, rtol=1e-4)
  # Not the pytorch-fid features: the preprocessing changes pool3 by ~3% here.
  assert np.abs(adm_out["pool"] - z["pool3"]).max() > 1e-2


def test_pytorch_fid_features(torch_path, params, z):
  out, _ = torch_path
  _close(out["pool"], z["pool3"], atol=1e-4, rtol=1e-4)
  _close(out["pool"], z["pool3_f64"], atol=1e-4, rtol=1e-4)
  _close(out["logits"], z["logits_nobias"], atol=1e-4, rtol=1e-4)
  _close(out["logits"], z["logits_nobias_f64"], atol=1e-4, rtol=1e-4)
  with_bias = out["pool"] @ params["fc"]["kernel"] + params["fc"]["bias"]
  _close(with_bias, z["logits"], atol=1e-4, rtol=1e-4)
  _close(out["probs"], z["softmax_nobias_adm_is"], atol=1e-6)
  _close(jax.nn.softmax(with_bias), z["softmax"], atol=1e-6)
  _close(out["spatial"], z["sfid_spatial_flat2023"], atol=2e-4, rtol=1e-4)
  _close(out["spatial"], z["sfid_spatial_flat2023_f64"], atol=2e-4, rtol=1e-4)


def test_sfid_layer_is_mixed_6d_branch1x1_not_6e(torch_path, z):
  out, inter = torch_path
  branch = inter["Mixed_6d_output"][..., :192]  # Mixed_6d's concat starts with branch1x1
  _close(branch[..., z["mixed6d_branch1x1_channels"]], z["mixed6d_branch1x1_nhwc_sub"],
         atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(out["spatial"], branch[..., :7].reshape(4, -1))
  # Negative control: the same recipe on Mixed_6e.branch1x1 (TF mixed_7/conv) is far away.
  neg = z["mixed6e_branch1x1_first7_flat2023_NOT_ADM"]
  assert np.abs(out["spatial"] - neg).max() > 1.0
  assert not np.allclose(out["spatial"], neg, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name, ref", [
    ("maxpool1", "block0_maxpool1_img0"), ("maxpool2", "block1_maxpool2_img0"),
    ("Mixed_5d_output", "mixed_5d_img0"), ("Mixed_6a_output", "mixed_6a_img0"),
    ("Mixed_6d_output", "mixed_6d_img0"), ("Mixed_6e_output", "block2_mixed6e_img0"),
    ("Mixed_7c_output", "mixed_7c_img0")])
def test_intermediate_maps(torch_path, z, name, ref):
  _, inter = torch_path
  got = inter[name][0][..., z[ref + "_channels"]]  # image 0, stored channels, HWC
  assert got.shape == z[ref + "_hwc_sub"].shape
  _close(got, z[ref + "_hwc_sub"], atol=1e-4 * float(z[ref + "_absmax"]))


def test_plain_call_sows_nothing(params, z):
  model = inc.FIDInception()
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, z["images_uint8_nhwc"])
  assert sorted(out) == ["logits", "pool", "probs", "spatial"]
  assert all(v.dtype == jnp.float32 for v in out.values())


# ---------------------------------------------------------------------------
# Loading a state dict / .pth.
# ---------------------------------------------------------------------------


def test_state_dict_round_trip(params, state_dict):
  assert len(state_dict) == 472 and inc.expected_state_dict_shapes().keys() == state_dict.keys()
  k = params["Mixed_6d"]["branch1x1"]["conv"]["kernel"]
  assert k.shape == (1, 1, 768, 192)
  np.testing.assert_array_equal(
      k, state_dict["Mixed_6d.branch1x1.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])
  assert params["fc"]["kernel"].shape == (2048, 1008)
  back = inc.state_dict_from_params(params)
  assert back.keys() == state_dict.keys()
  for key, v in state_dict.items():
    np.testing.assert_array_equal(back[key], v, err_msg=key)


def _one_line_error(fn, *needles):
  with pytest.raises(ConversionError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert n in msg, msg
  return msg


def test_state_dict_mismatches_refused_in_one_line(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6d.branch1x1.bn.running_var"]
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  _one_line_error(lambda: inc.params_from_state_dict(sd, "bad.pth"), "bad.pth",
                  "missing keys: Mixed_6d.branch1x1.bn.running_var",
                  "unexpected keys: AuxLogits.fc.weight",
                  "mis-shaped: fc.weight (1000, 2048) (expected (1008, 2048))")


def test_num_batches_tracked_ignored(state_dict, params):
  sd = dict(state_dict)
  for key in list(state_dict):
    if key.endswith(".bn.running_var"):
      sd[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  assert len(sd) == 472 + 94
  got = inc.params_from_state_dict(sd, "x.pth")
  jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_pth(tmp_path, state_dict, params, legacy):
  """torch.save'd file (zip or the legacy format pytorch-fid's release uses), ~96 MB, ~3 s."""
  torch = pytest.importorskip("torch")
  tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  tensors["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
  path = str(tmp_path / "pt_inception.pth")
  torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
  del tensors
  model, got = inc.load_fid_inception(path, preprocessing="pytorch_fid")
  assert model.preprocessing == "pytorch_fid" and model.dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, got, params)  # bitwise


def test_bad_files_refused(tmp_path):
  junk = tmp_path / "pt_inception.pth"
  junk.write_bytes(b"not a checkpoint")
  _one_line_error(lambda: inc.load_fid_inception(str(junk)), str(junk), "PyTorch")
  bad_pb = tmp_path / "classify_image_graph_def.pb"
  bad_pb.write_bytes(b"\xff\xff\xff\xff garbage")
  _one_line_error(lambda: inc.load_fid_inception(str(bad_pb)), str(bad_pb), "GraphDef")
  other = tmp_path / "weights.npz"
  other.write_bytes(b"")
  _one_line_error(lambda: inc.load_fid_inception(str(other)), str(other), ".pth", ".pb")
  _one_line_error(lambda: inc.load_fid_inception(str(tmp_path / "missing.pth")), "no such file")
  with pytest.raises(UserError, match="preprocessing"):
    inc.load_fid_inception(str(junk), preprocessing="tf")


# ---------------------------------------------------------------------------
# The TF graph (classify_image_graph_def.pb) without TensorFlow.
# ---------------------------------------------------------------------------

# The 2015 graph's conv scopes, block by block, as torch-fidelity's converter maps them
# (written out here independently of inception_tf.TF_SCOPES, which is checked against it).
_TF_BLOCKS = [("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"),
              ("mixed_2", "Mixed_5d", "A"), ("mixed_3", "Mixed_6a", "B"),
              ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
              ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"),
              ("mixed_8", "Mixed_7a", "D"), ("mixed_9", "Mixed_7b", "E"),
              ("mixed_10", "Mixed_7c", "E")]
_TF_BRANCHES = {
    "A": "conv=branch1x1 tower/conv=branch5x5_1 tower/conv_1=branch5x5_2 "
         "tower_1/conv=branch3x3dbl_1 tower_1/conv_1=branch3x3dbl_2 tower_1/conv_2=branch3x3dbl_3 "
         "tower_2/conv=branch_pool",
    "B": "conv=branch3x3 tower/conv=branch3x3dbl_1 tower/conv_1=branch3x3dbl_2 "
         "tower/conv_2=branch3x3dbl_3",
    "C": "conv=branch1x1 tower/conv=branch7x7_1 tower/conv_1=branch7x7_2 tower/conv_2=branch7x7_3 "
         "tower_1/conv=branch7x7dbl_1 tower_1/conv_1=branch7x7dbl_2 tower_1/conv_2=branch7x7dbl_3 "
         "tower_1/conv_3=branch7x7dbl_4 tower_1/conv_4=branch7x7dbl_5 tower_2/conv=branch_pool",
    "D": "tower/conv=branch3x3_1 tower/conv_1=branch3x3_2 tower_1/conv=branch7x7x3_1 "
         "tower_1/conv_1=branch7x7x3_2 tower_1/conv_2=branch7x7x3_3 tower_1/conv_3=branch7x7x3_4",
    "E": "conv=branch1x1 tower/conv=branch3x3_1 tower/mixed/conv=branch3x3_2a "
         "tower/mixed/conv_1=branch3x3_2b tower_1/conv=branch3x3dbl_1 "
         "tower_1/conv_1=branch3x3dbl_2 "
         "tower_1/mixed/conv=branch3x3dbl_3a tower_1/mixed/conv_1=branch3x3dbl_3b "
         "tower_2/conv=branch_pool",
}


def _tf_scopes() -> dict[str, str]:
  scopes = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
  for tf_block, pt_block, kind in _TF_BLOCKS:
    for pair in _TF_BRANCHES[kind].split():
      tf_name, pt_name = pair.split("=")
      scopes[f"{tf_block}/{tf_name}"] = f"{pt_block}.{pt_name}"
  return scopes


def test_tf_scope_table():
  scopes = _tf_scopes()
  assert inception_tf.TF_SCOPES == scopes and len(scopes) == 94
  modules = {k.rsplit(".", 2)[0] for k in inc.expected_state_dict_shapes() if ".conv." in k}
  assert set(scopes.values()) == modules
  assert scopes["mixed_6/conv"] == "Mixed_6d.branch1x1"  # ADM's sFID tensor mixed_6/conv:0


def _make_graph(state_dict):
  """A GraphDef with the 2015 graph's weight node names, ops and attrs, holding ``state_dict``."""
  from tensorboardX.proto import graph_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import types_pb2  # pylint: disable=g-import-not-at-top
  graph = graph_pb2.GraphDef()

  def const(name, value, as_list=False):
    node = graph.node.add(name=name, op="Const")
    node.attr["dtype"].type = types_pb2.DT_FLOAT
    t = node.attr["value"].tensor
    t.dtype = types_pb2.DT_FLOAT
    for d in value.shape:
      t.tensor_shape.dim.add(size=d)
    if as_list:  # small tensors as float_val, the big ones as raw bytes: both encodings occur
      t.float_val.extend(value.ravel().tolist())
    else:
      t.tensor_content = np.ascontiguousarray(value, "<f4").tobytes()

  graph.node.add(name="ExpandDims", op="ExpandDims")
  prev = "ExpandDims"
  for scope, module in _tf_scopes().items():
    const(f"{scope}/conv2d_params", state_dict[f"{module}.conv.weight"].transpose(2, 3, 1, 0))
    graph.node.add(name=f"{scope}/Conv2D", op="Conv2D", input=[prev, f"{scope}/conv2d_params"])
    bn_inputs = [f"{scope}/Conv2D"]
    for leaf, key in (("moving_mean", "running_mean"), ("moving_variance", "running_var"),
                      ("beta", "bias"), ("gamma", "weight")):
      const(f"{scope}/batchnorm/{leaf}", state_dict[f"{module}.bn.{key}"], as_list=leaf == "beta")
      bn_inputs.append(f"{scope}/batchnorm/{leaf}")
    bn = graph.node.add(name=f"{scope}/batchnorm", op="BatchNormWithGlobalNormalization",
                        input=bn_inputs)
    bn.attr["variance_epsilon"].f = 0.001
    bn.attr["scale_after_normalization"].b = True
    graph.node.add(name=scope, op="Relu", input=[f"{scope}/batchnorm"])
    prev = scope
  const("softmax/weights", state_dict["fc.weight"].T)
  const("softmax/biases", state_dict["fc.bias"], as_list=True)
  graph.node.add(name="softmax/logits/MatMul", op="MatMul", input=["pool_3/_reshape",
                                                                   "softmax/weights"])
  return graph


@pytest.fixture(scope="module")
def graph(state_dict):
  return _make_graph(state_dict)


def test_load_pb_bitwise_equal_to_pth(graph, tmp_path, params, net_fn, adm_path, z):
  path = str(tmp_path / "classify_image_graph_def.pb")
  with open(path, "wb") as f:
    f.write(graph.SerializeToString())
  model, got = inc.load_fid_inception(path)
  assert model.preprocessing == "adm"
  jax.tree.map(np.testing.assert_array_equal, got, params)  # .pb and .pth: the same bits
  out, _ = net_fn(got, inc.preprocess(z["images_uint8_nhwc"], "adm"))
  jax.tree.map(np.testing.assert_array_equal, out, adm_path[0])  # so the same features
  _close(out["pool"], z["adm_pool3"], atol=1e-4, rtol=1e-4)
  _close(out["spatial"], z["adm_sfid_spatial_flat2023"], atol=2e-4, rtol=1e-4)


def test_pb_batchnorm_attributes(graph, tmp_path, params):
  path = str(tmp_path / "g.pb")
  bns = [n for n in graph.node if n.op == "BatchNormWithGlobalNormalization"]
  try:
    # scale_after_normalization=False: TensorFlow ignores gamma, so the scale is one.
    for n in bns:
      n.attr["scale_after_normalization"].b = False
    with open(path, "wb") as f:
      f.write(graph.SerializeToString())
    sd = inception_tf.fid_inception_state_dict(path)
    ref = inc.state_dict_from_params(params)
    for key, v in sd.items():
      if key.endswith(".bn.weight"):
        np.testing.assert_array_equal(v, np.ones_like(v), err_msg=key)
      else:
        np.testing.assert_array_equal(v, ref[key], err_msg=key)
    for n in bns:
      n.attr["scale_after_normalization"].b = True
    bns[7].attr["variance_epsilon"].f = 1e-5
    with open(path, "wb") as f:
      f.write(graph.SerializeToString())
    _one_line_error(lambda: inception_tf.fid_inception_state_dict(path), path,
                    f"{bns[7].name} has variance_epsilon")
  finally:
    for n in bns:
      n.attr["scale_after_normalization"].b = True
      n.attr["variance_epsilon"].f = 0.001


def test_pb_missing_nodes_refused(graph, tmp_path):
  path = str(tmp_path / "other.pb")
  node = next(n for n in graph.node if n.name == "mixed_6/tower/conv_1/batchnorm/gamma")
  try:
    node.name = "renamed"
    with open(path, "wb") as f:
      f.write(graph.SerializeToString())
  finally:
    node.name = "mixed_6/tower/conv_1/batchnorm/gamma"
  _one_line_error(lambda: inc.load_fid_inception(path), path, "not the 2015 Inception graph",
                  "1 of its 472 weight nodes missing: mixed_6/tower/conv_1/batchnorm/gamma")


# ---------------------------------------------------------------------------
# Jit + batch sharding over 8 fake CPU devices.
# ---------------------------------------------------------------------------


def _sharded_worker(params_path, out_path):  # runs in the subprocess (8 fake devices)
  assert jax.device_count() == 8, jax.devices()
  images = np.concatenate([np.load(NPZ)["images_uint8_nhwc"]] * 2)  # 8 images, 1 per device
  params = {}
  for key, value in np.load(params_path).items():
    node = params
    for name in key.split("/")[:-1]:
      node = node.setdefault(name, {})
    node[key.split("/")[-1]] = value
  out = inc.make_feature_fn(inc.FIDInception())(params, images)  # default: ADM preprocessing
  assert len(out["pool"].sharding.device_set) == 8
  np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})


def test_sharded_over_8_devices_matches_one(tmp_path, params, adm_path, z):
  """The default model (ADM preprocessing inside), jitted and batch-sharded over 8 devices."""
  params_path, out_path = str(tmp_path / "params.npz"), str(tmp_path / "sharded.npz")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  np.savez(params_path, **{"/".join(k.key for k in path): v for path, v in flat})
  env = cpu_env(8)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharded-worker",
                         params_path, out_path],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = dict(np.load(out_path))
  for key, value in got.items():  # the same image on two devices: the same bits
    np.testing.assert_array_equal(value[:4], value[4:], err_msg=key)
  # vs one device, batch 4: the convolutions give the same bits on CPU, but the 2048-term fc
  # matmul sums in another order for batch 1 (gemv) than 4 (gemm): measured 8.6e-6 on logits
  # (|logits| <= 5.7), 3.4e-7 on probs. Tolerances 1e-5 (pool, spatial), 5e-5 (logits), 1e-6
  # (probs), all far below the golden tolerances, which are checked too.
  one, _ = adm_path
  for key, atol in (("pool", 1e-5), ("spatial", 1e-5), ("logits", 5e-5), ("probs", 1e-6)):
    _close(got[key][:4], one[key], atol=atol)
  _close(got["pool"][:4], z["adm_pool3"], atol=1e-4, rtol=1e-4)
  _close(got["logits"][:4], z["adm_logits_nobias"], atol=1e-4, rtol=1e-4)
  _close(got["probs"][:4], z["adm_softmax_nobias"], atol=1e-6)
  _close(got["spatial"][:4], z["adm_sfid_spatial_flat2023"], atol=2e-4, rtol=1e-4)


if __name__ == "__main__" and sys.argv[1:2] == ["--sharded-worker"]:
  _sharded_worker(sys.argv[2], sys.argv[3])
