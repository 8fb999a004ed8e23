"""deepflow_jax.outputs: manifest checks, fresh folders, atomic files, stale temps, digests."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepflow_jax import outputs
from deepflow_jax.models import vae as vae_lib
from deepflow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_DIR = os.path.join(ROOT, "tests", "data", "vae_tiny")

SETTINGS = {"resolution": 32, "format": "repa", "vae_digest": "aa", "shape": [8, 8, 4],
            "limit": None}


def tree_bytes(root):
  """{relative path: bytes} of every file, plus every folder (value None)."""
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def folder(path, **kw):
  kw.setdefault("manifest", "progress/settings.json")
  return outputs.OutputFolder(path, format="test/v1", what="a test output",
                              labels={"vae_digest": "the VAE weights differ"}, **kw)


# ---------------------------------------------------------------------------- manifest


def test_fresh_folder_records_settings_and_rerun_resumes(tmp_path):
  out = tmp_path / "out"
  doc, resumed = folder(out).open(SETTINGS, {"note": "first"})
  assert not resumed and doc["settings"] == SETTINGS and doc["info"] == {"note": "first"}
  with open(out / "progress" / "settings.json") as f:
    assert json.load(f) == {"format": "test/v1", "settings": SETTINGS, "info": {"note": "first"}}
  # Same settings (a tuple reads back as the list JSON stores): resumed, info kept.
  again = dict(SETTINGS, shape=(8, 8, 4))
  doc, resumed = folder(out).open(again, {"note": "second"})
  assert resumed and doc["info"] == {"note": "first"}
  assert sorted(os.listdir(out / "progress")) == ["settings.json"]  # no temporary left


def test_other_settings_are_refused_with_the_diff_and_nothing_changes(tmp_path):
  out = tmp_path / "out"
  folder(out).open(SETTINGS)
  (out / "data.bin").write_bytes(b"work")
  before = tree_bytes(out)
  changed = dict(SETTINGS, resolution=64, vae_digest="bb", extra=1)
  del changed["limit"]
  with pytest.raises(UserError) as e:
    folder(out).open(changed)
  msg = str(e.value)
  assert "\n" not in msg and "other settings" in msg and "nothing was changed" in msg
  # Every differing key, sorted, and nothing about the equal ones.
  assert ("(extra: absent there, 1 now; limit: None there, absent now; "
          "resolution: 32 there, 64 now; vae_digest: the VAE weights differ)") in msg
  assert "format" not in msg.split("(")[1] and "shape" not in msg
  assert tree_bytes(out) == before


def test_manifest_of_another_format_or_unreadable_is_refused(tmp_path):
  out = tmp_path / "out"
  folder(out).open(SETTINGS)
  other = outputs.OutputFolder(out, manifest="progress/settings.json", format="test/v2",
                               what="a test output")
  with pytest.raises(UserError, match="format 'test/v1', expected 'test/v2'"):
    other.open(SETTINGS)
  (out / "progress" / "settings.json").write_text("{not json")
  before = tree_bytes(out)
  with pytest.raises(UserError, match="unreadable"):
    folder(out).open(SETTINGS)
  assert tree_bytes(out) == before


def test_non_empty_folder_without_manifest_is_refused_untouched(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(UserError, match="not empty and not a test output"):
    folder(out).open(SETTINGS)
  assert tree_bytes(out) == {"keep.txt": b"x"}
  # A folder holding anything but the manifest in the manifest's folder is not fresh either.
  other = tmp_path / "other"
  (other / "progress").mkdir(parents=True)
  (other / "progress" / "shard-00000.json").write_text("{}")
  assert not folder(other).is_fresh()
  # A file where the folder should be: refused, left as it is.
  (tmp_path / "file").write_text("y")
  with pytest.raises(UserError, match="not a directory"):
    folder(tmp_path / "file").open(SETTINGS)
  assert (tmp_path / "file").read_text() == "y"


def test_fresh_folders(tmp_path):
  assert folder(tmp_path / "missing").is_fresh()
  out = tmp_path / "out"
  out.mkdir()
  assert folder(out).is_fresh()
  (out / ".DS_Store").write_text("")  # hidden entries do not count
  (out / "progress").mkdir()
  # another process's manifest being written: still fresh
  (out / "progress" / "settings.json.tmp-4242").write_text("{")
  assert folder(out).is_fresh()
  doc, resumed = folder(out).open(SETTINGS)
  assert not resumed
  top = outputs.OutputFolder(tmp_path / "top", manifest="manifest.json", format="f", what="w")
  doc, resumed = top.open({"a": 1})
  assert not resumed and os.listdir(tmp_path / "top") == ["manifest.json"]


def test_refused_runs_create_nothing(tmp_path):
  out = tmp_path / "new" / "out"
  f = folder(out)
  f.open(SETTINGS)
  with pytest.raises(UserError):
    folder(out).open(dict(SETTINGS, resolution=1))
  assert tree_bytes(tmp_path / "new") == {"out/": None, "out/progress/": None,
                                          "out/progress/settings.json": outputs.json_bytes(
                                              {"format": "test/v1", "settings": SETTINGS,
                                               "info": {}})}


def test_settings_diff():
  assert outputs.settings_diff({"a": 1, "b": [1]}, {"a": 1, "b": (1,)}) == [
      "b: [1] there, (1,) now"]
  assert outputs.settings_diff({"d": "x"}, {"d": "y"}, {"d": "the weights differ"}) == [
      "d: the weights differ"]
  assert outputs.settings_diff({}, {}) == []


# ---------------------------------------------------------------------------- files


def test_atomic_writes_leave_only_the_final_files(tmp_path):
  outputs.atomic_write_bytes(str(tmp_path / "a.bin"), b"\x00\x01")
  outputs.atomic_write_json(str(tmp_path / "b.json"), {"x": [1, 2]})
  arr = np.arange(12, dtype=np.float32).reshape(3, 4)
  outputs.atomic_save_npy(str(tmp_path / "c.npy"), arr)
  img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  outputs.atomic_save_png(str(tmp_path / "d.png"), img, compress_level=0)
  outputs.atomic_save_png(str(tmp_path / "e.png"), img)
  assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.json", "c.npy", "d.png", "e.png"]
  assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
  assert (tmp_path / "b.json").read_text() == '{\n "x": [\n  1,\n  2\n ]\n}\n'
  np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), arr)
  for name in ("d.png", "e.png"):
    with Image.open(tmp_path / name) as im:
      np.testing.assert_array_equal(np.asarray(im), img)
  # compress_level=0 stores the pixels uncompressed: a flat image stays large (>= its
  # 64*64*3 pixel bytes), while PIL's default compresses it to far less.
  flat = np.full((64, 64, 3), 7, np.uint8)
  outputs.atomic_save_png(str(tmp_path / "f0.png"), flat, compress_level=0)
  outputs.atomic_save_png(str(tmp_path / "f6.png"), flat)
  assert os.path.getsize(tmp_path / "f0.png") >= flat.size > 10 * os.path.getsize(
      tmp_path / "f6.png")


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = str(tmp_path / "x.json")
  outputs.atomic_write_json(path, {"v": 1})

  def fail(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    outputs.atomic_write(path, fail)
  assert os.listdir(tmp_path) == ["x.json"] and outputs.read_json(path) == {"v": 1}


def test_tmp_names():
  t = outputs.tmp_name("/a/b.npy")
  assert t == f"/a/b.npy.tmp-{os.getpid()}" and outputs.is_tmp_name(t)
  assert outputs.final_name(os.path.basename(t)) == "b.npy"
  assert outputs.is_tmp_name("b.npy.tmp") and outputs.final_name("b.npy.tmp") == "b.npy"
  for name in ("b.npy", "b.tmpl", "x.tmp-", "x.tmp-12a", "tmp"):
    assert not outputs.is_tmp_name(name), name


def test_remove_stale_tmp(tmp_path):
  for name in ("a.npy.tmp-123", "b.json.tmp", "c.npy", "d.tmpx", "e.png.tmp-9",
               "sub/f.npy.tmp-1", "sub/g.npy"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  # Only temporaries whose final file the caller owns:
  removed = outputs.remove_stale_tmp(str(tmp_path), owned=lambda p: p.endswith(".npy"))
  assert removed == [str(tmp_path / "a.npy.tmp-123")]
  removed = outputs.remove_stale_tmp(str(tmp_path))
  assert sorted(os.path.basename(p) for p in removed) == ["b.json.tmp", "e.png.tmp-9"]
  assert (tmp_path / "sub" / "f.npy.tmp-1").exists()  # not recursive by default
  assert outputs.remove_stale_tmp(str(tmp_path), recursive=True) == [
      str(tmp_path / "sub" / "f.npy.tmp-1")]
  assert sorted(tree_bytes(tmp_path)) == ["c.npy", "d.tmpx", "sub/", "sub/g.npy"]
  assert outputs.remove_stale_tmp(str(tmp_path / "missing")) == []


def test_create_exclusive_and_markers(tmp_path):
  path = str(tmp_path / "m.json")
  assert outputs.create_exclusive(path, b"first")
  assert not outputs.create_exclusive(path, b"second")
  assert open(path, "rb").read() == b"first" and os.listdir(tmp_path) == ["m.json"]
  marker = str(tmp_path / "shard-0.json")
  assert outputs.finished_record(marker) is None
  outputs.mark_finished(marker, {"shard": 0, "examples": [[0, 1]]})
  assert outputs.finished_record(marker) == {"shard": 0, "examples": [[0, 1]]}


# ---------------------------------------------------------------------------- digests


def sample_tree():
  return {"enc": {"conv_in": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
                              "bias": np.array([-1.5, 0.0, 2.25], np.float32)}},
          "layers": [np.array([1, -2, 3], np.int32), jnp.arange(4, dtype=jnp.float16) * 0.5],
          "scalar": np.float64(3.0)}


def test_tree_digest_equals_the_digests_already_written():
  # Hex strings computed by the previous two copies of this function,
  # preprocess.vae_digest and generate.params_digest (commit 0d651a4), on the same
  # trees: settings files written by them must still match, or resuming breaks.
  assert outputs.tree_digest(sample_tree()) == "beec9eb33b808d4cab1d035fa50cf9a5"
  _, params = vae_lib.load_diffusers_vae(VAE_DIR)
  assert outputs.tree_digest(params) == "6bfa6baf3207fb3ec9baf1dfbe629951"


def test_tree_digest_sees_values_names_dtypes_and_shapes():
  base = outputs.tree_digest(sample_tree())
  assert outputs.tree_digest(sample_tree()) == base  # stable
  def changed_value(t):
    t["enc"]["conv_in"]["bias"][1] = 1e-7

  def renamed(t):
    t["enc"]["conv"] = t["enc"].pop("conv_in")

  def other_dtype(t):
    t["layers"][0] = t["layers"][0].astype(np.int64)  # same values

  def other_shape(t):
    t["enc"]["conv_in"]["kernel"] = t["enc"]["conv_in"]["kernel"].reshape(6, 4)  # same bytes

  variants = []
  for change in (changed_value, renamed, other_dtype, other_shape):
    t = sample_tree()
    change(t)
    variants.append(t)
  digests = {outputs.tree_digest(v) for v in variants}
  assert len(digests) == len(variants) and base not in digests
  # bfloat16 leaves (which a plain memoryview cannot export) work, and differ from float32.
  bf = outputs.tree_digest({"w": jnp.ones((2, 2), jnp.bfloat16)})
  assert len(bf) == 32 and bf != outputs.tree_digest({"w": jnp.ones((2, 2), jnp.float32)})
