"""deepflow_jax.preprocess: reference crop, both formats, resume, hosts, devices, TFDS.

The command line (``preprocess.main``) drives the library modules
``data.image_sources`` (crop, sources), ``data.latent_writer`` (layouts,
resumable state) and ``data.encode`` (the job).
"""
import io
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from conftest import cpu_env
from deepflow_jax import preprocess
from deepflow_jax.data import encode
from deepflow_jax.data import image_sources
from deepflow_jax.data import latent_writer
from deepflow_jax.data import records
from deepflow_jax.data.arrayrecord import ArrayRecordLatentSource
from deepflow_jax.data.pipeline import make_train_iterator
from deepflow_jax.data.repa import RepaLatentSource
from deepflow_jax.models import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_DIR = os.path.join(ROOT, "tests", "data", "vae_tiny")
RES = 32  # the tiny VAE downsamples by 4: latents (8, 8, 4)

# (relative path, mode, (width, height)); None mode: not an image. Classes are created
# out of order; n00_empty has no image and is not a class.
FILES = [
    ("n03_fish/big.jpg", "RGB", (700, 530)),
    ("n01_cat/img_b.jpg", "RGB", (37, 53)),
    ("n01_cat/img_a.png", "RGBA", (40, 41)),
    ("n01_cat/sub/deep.png", "L", (300, 90)),
    ("n02_dog/pal.png", "P", (33, 70)),
    ("n02_dog/cmyk.jpg", "CMYK", (64, 48)),
    ("n02_dog/corrupt.jpg", "truncated", (50, 50)),
    ("n03_fish/notes.txt", None, None),
]
# The expected order: classes sorted, files sorted within a class.
ORDER = ["n01_cat/img_a.png", "n01_cat/img_b.jpg", "n01_cat/sub/deep.png",
         "n02_dog/cmyk.jpg", "n02_dog/corrupt.jpg", "n02_dog/pal.png", "n03_fish/big.jpg"]
LABELS = [0, 0, 0, 1, 1, 1, 2]
CORRUPT = 4
GOOD = [i for i in range(len(ORDER)) if i != CORRUPT]


def reference_crop(pil_image, size):
  """The reference algorithm restated plainly (ADM / REPA centre crop)."""
  pil_image = pil_image.convert("RGB")
  while min(*pil_image.size) >= 2 * size:
    w, h = pil_image.size
    pil_image = pil_image.resize((w // 2, h // 2), resample=Image.BOX)
  w, h = pil_image.size
  s = size / min(w, h)
  pil_image = pil_image.resize((round(w * s), round(h * s)), resample=Image.BICUBIC)
  a = np.array(pil_image)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def make_image(mode, size, seed):
  rng = np.random.default_rng(seed)
  w, h = size
  # smooth gradients + noise: JPEG-friendly, and resampling filters matter
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                   ((xx + yy) * 255 // max(w + h - 2, 1))], -1)
  rgb = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
  img = Image.fromarray(rgb, "RGB")
  if mode == "RGBA":
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
  elif mode == "P":
    img = img.convert("P", palette=Image.ADAPTIVE, colors=16)
  elif mode in ("L", "CMYK"):
    img = img.convert(mode)
  return img


def write_folder(root):
  os.makedirs(os.path.join(root, "n00_empty"))
  for k, (rel, mode, size) in enumerate(FILES):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode is None:
      with open(path, "w") as f:
        f.write("not an image")
    elif mode == "truncated":
      buf = io.BytesIO()
      make_image("RGB", size, k).save(buf, format="JPEG")
      with open(path, "wb") as f:
        f.write(buf.getvalue()[:300])  # a valid header, then nothing
    else:
      make_image(mode, size, k).save(path)


def run(argv, capsys=None):
  rc = preprocess.main([str(a) for a in argv])
  cap = capsys.readouterr() if capsys is not None else None
  return rc, cap


def args(src, out, **kw):
  a = {"source": f"imagefolder:{src}", "vae": VAE_DIR, "output": out, "resolution": RES,
       "examples_per_shard": 3, "batch_size": 2, "num_workers": 2}
  a.update(kw)
  return [f"--{k}" if v is True else f"--{k}={v}" for k, v in a.items() if v is not False]


def encode_first_shard(src, out, **kw):
  """Encodes until the first shard is finished, then stops there as a signal would (the
  library's ``should_stop``): what an interrupted run leaves, for the resumption tests."""
  a = {"resolution": RES, "examples_per_shard": 3, "batch_size": 2, "num_workers": 2}
  a.update(kw)
  res = encode.encode_dataset(f"imagefolder:{src}", VAE_DIR, str(out), should_stop=lambda: True,
                              log=lambda msg: None, **a)
  assert res.stopped and res.exit_status == 0 and res.shards_written == 1


def tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def assert_same_tree(a, b):
  ta, tb = tree_bytes(a), tree_bytes(b)
  assert sorted(ta) == sorted(tb)
  for k in ta:
    assert ta[k] == tb[k], k


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagefolder")
  write_folder(str(root))
  return str(root)


@pytest.fixture(scope="module")
def expected(folder):
  """Crops, mean and std of the readable images, encoded directly with the VAE."""
  crops = []
  for rel in ORDER:
    if rel.endswith("corrupt.jpg"):
      crops.append(None)
      continue
    with Image.open(os.path.join(folder, rel)) as img:
      crops.append(reference_crop(img, RES))
  vae, params = vae_lib.load_diffusers_vae(VAE_DIR)
  x = np.stack([crops[i] for i in GOOD]).astype(np.float32) / 127.5 - 1
  mean, std = vae.apply({"params": params}, x, method=vae.encode)
  mean_all, std_all = {}, {}
  for k, i in enumerate(GOOD):
    mean_all[i], std_all[i] = np.asarray(mean[k]), np.asarray(std[k])
  return {"crops": crops, "mean": mean_all, "std": std_all}


@pytest.fixture(scope="module")
def arrayrecord_out(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ar") / "out")
  rc = preprocess.main(args(folder, out))
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def repa_out(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("repa") / "out")
  rc = preprocess.main(args(folder, out, format="repa", save_images=True))
  assert rc == 0
  return out


# ---------------------------------------------------------------------------- crop


@pytest.mark.parametrize("size,res", [((37, 53), 32), ((300, 90), 32), ((700, 530), 64),
                                      ((64, 64), 64), ((128, 300), 64), ((255, 129), 64),
                                      ((1000, 999), 256)])
def test_center_crop_matches_reference(size, res):
  img = make_image("RGB", size, 0)
  got = image_sources.center_crop_arr(img, res)
  assert got.shape == (res, res, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
  np.testing.assert_array_equal(got, reference_crop(img, res))


def test_center_crop_box_halving_path_matters():
  img = make_image("RGB", (700, 530), 1)
  got = image_sources.center_crop_arr(img, 64)
  # Without the BOX halvings (a direct bicubic resize) the pixels differ.
  s = 64 / 530
  direct = np.array(img.resize((round(700 * s), round(530 * s)), Image.BICUBIC))
  y, x = (direct.shape[0] - 64) // 2, (direct.shape[1] - 64) // 2
  assert not np.array_equal(got, direct[y:y + 64, x:x + 64])


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_center_crop_converts_modes(mode):
  img = make_image(mode, (45, 61), 2)
  got = image_sources.center_crop_arr(img, 32)
  np.testing.assert_array_equal(got, reference_crop(img, 32))
  np.testing.assert_array_equal(got, image_sources.center_crop_arr(img.convert("RGB"), 32))


def test_imagefolder_order_and_labels(folder):
  src = image_sources.ImageFolderSource(folder)
  assert src.files == ORDER and src.labels == LABELS
  assert src.class_names == ["n01_cat", "n02_dog", "n03_fish"]
  assert src.ignored == {"files without an image extension": 1, "folders without images": 1}
  assert image_sources.ImageFolderSource(folder, limit=4).files == ORDER[:4]


# ---------------------------------------------------------------------------- outputs


def check_values(source, expected):
  assert len(source) == len(GOOD)
  for k, i in enumerate(GOOD):
    ex = source[k]
    assert int(ex["label"]) == LABELS[i]
    np.testing.assert_allclose(ex["mean"], expected["mean"][i], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ex["std"], expected["std"][i], atol=1e-5, rtol=0)


def test_arrayrecord_output(arrayrecord_out, expected):
  src = ArrayRecordLatentSource(arrayrecord_out)
  assert src.info.shape == (8, 8, 4) and src.info.num_classes == 3
  assert src.info.num_examples == 6 and src.info.resolution == RES
  check_values(src, expected)
  with open(os.path.join(arrayrecord_out, records.METADATA_FILE)) as f:
    meta = json.load(f)
  assert meta["shards"] == [records.shard_name("train", s, 3) for s in range(3)]
  assert meta["num_skipped"] == 1 and meta["skipped"] == ["n02_dog/corrupt.jpg"]
  assert meta["class_names"] == ["n01_cat", "n02_dog", "n03_fish"]
  assert meta["vae_downsampling"] == 4  # the tiny VAE's: 32 px -> 8 x 8 latents
  # The records' index is the source position: the corrupt image leaves a gap.
  indices = []
  for name in meta["shards"]:
    r = array_record_module.ArrayRecordReader(os.path.join(arrayrecord_out, name))
    indices += [records.decode_record(b)["index"] for b in r.read_all()]
    r.close()
  assert indices == GOOD
  # and it trains: the grain pipeline reads it
  it = make_train_iterator({"name": "arrayrecord", "path": arrayrecord_out},
                                    global_batch_size=3, process_index=0, process_count=1,
                                    seed=0)
  assert next(it)["mean"].shape == (3, 8, 8, 4)


def test_repa_output_and_images(repa_out, expected):
  src = RepaLatentSource(repa_out)
  check_values(src, expected)
  assert src.files == [latent_writer.repa_feature_name(i) for i in GOOD]
  arr = np.load(os.path.join(repa_out, "vae-sd", "00000", "img-mean-std-00000006.npy"))
  with open(os.path.join(repa_out, "vae-sd", "dataset.json")) as f:
    meta = json.load(f)
  assert meta["vae_downsampling"] == 4 and meta["scaling_factor"] == vae_lib.load_diffusers_vae(
      VAE_DIR)[0].latent_scale  # the encoding VAE's, recorded for training and decoding
  assert arr.shape == (8, 8, 8) and arr.dtype == np.float32  # (2c, h, w)
  with open(os.path.join(repa_out, "images", "dataset.json")) as f:
    labels = json.load(f)["labels"]
  assert labels == [[f"00000/img{i:08d}.png", LABELS[i]] for i in GOOD]
  for i in GOOD:
    with Image.open(os.path.join(repa_out, "images", "00000", f"img{i:08d}.png")) as img:
      assert img.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(img), expected["crops"][i])
  assert not [f for f in tree_bytes(repa_out) if ".tmp" in f]


def test_arrayrecord_save_images_stores_each_crop_in_its_record(folder, expected, tmp_path,
                                                                capsys):
  """--save_images with ArrayRecord: the crop is the record's optional image field (for SSL)."""
  out = tmp_path / "out"
  rc, _ = run(args(folder, out, save_images=True), capsys)
  assert rc == 0
  assert not (out / "images").exists()  # in the records, not as a PNG folder
  with open(out / records.METADATA_FILE) as f:
    assert json.load(f)["image_shape"] == [RES, RES, 3]
  src = ArrayRecordLatentSource(str(out), images=True)
  assert src.info.image_shape == (RES, RES, 3)
  check_values(src, expected)  # the latents are those written without images
  batch = src.read_batch(np.arange(len(src)))
  for k, i in enumerate(GOOD):
    np.testing.assert_array_equal(batch["image"][k], expected["crops"][i])
  with open(out / "progress" / "settings.json") as f:
    assert json.load(f)["settings"]["images_in_records"] is True


def test_unreadable_image_reported_and_counted(folder, tmp_path, capsys):
  rc, cap = run(args(folder, tmp_path / "out", limit=5), capsys)
  assert rc == 0
  assert "n02_dog/corrupt.jpg" in cap.err and "skipping unreadable image" in cap.err
  assert "1 unreadable image(s) skipped" in cap.out and "n02_dog/corrupt.jpg" in cap.out
  assert "images/s" in cap.out and "ETA" in cap.out
  with open(tmp_path / "out" / "progress" / "summary.json") as f:
    summary = json.load(f)
  assert summary["num_written"] == 4 and summary["num_skipped"] == 1
  assert summary["skipped"][0]["index"] == CORRUPT
  assert summary["skipped"][0]["name"] == "n02_dog/corrupt.jpg"


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("fmt", ["arrayrecord", "repa"])
def test_resume_after_interruption_is_identical(fmt, folder, arrayrecord_out, repa_out, tmp_path,
                                                capsys):
  out = tmp_path / "out"
  extra = {"format": "repa", "save_images": True} if fmt == "repa" else {}
  encode_first_shard(folder, out, **extra)
  files = tree_bytes(out)
  assert "metadata.json" not in files and "vae-sd/dataset.json" not in files
  assert "progress/shard-00000-of-00003.json" in files
  assert "progress/shard-00001-of-00003.json" not in files
  # What a kill in the middle of shard 1 leaves behind:
  if fmt == "arrayrecord":
    (out / "train-00001-of-00003.array_record.tmp").write_bytes(b"partial")
  else:
    (out / "vae-sd" / "00000").mkdir(parents=True, exist_ok=True)
    (out / "vae-sd" / "00000" / "img-mean-std-00000003.npy.tmp").write_bytes(b"partial")
    (out / "vae-sd" / "00000" / "img-mean-std-00000003.npy").write_bytes(b"stale")
    (out / "vae-sd" / "00000" / "img-mean-std-00000004.npy").write_bytes(b"stale")  # corrupt's
  rc, cap = run(args(folder, out, batch_size=3, **extra), capsys)  # batch size may change
  assert rc == 0 and "1 already done" in cap.out
  assert_same_tree(out, arrayrecord_out if fmt == "arrayrecord" else repa_out)


def test_mismatched_restart_is_refused(folder, tmp_path, capsys):
  out = tmp_path / "out"
  encode_first_shard(folder, out)
  before = tree_bytes(out)
  for change, word in [({"resolution": 64}, "resolution"),
                       ({"examples_per_shard": 2}, "examples_per_shard"),
                       ({"format": "repa"}, "format"), ({"limit": 3}, "limit"),
                       ({"precision": "default"}, "precision")]:
    rc, cap = run(args(folder, out, **change), capsys)
    assert rc == 2, change
    assert "other settings" in cap.err and word in cap.err and "nothing was changed" in cap.err
    assert tree_bytes(out) == before
  # a non-empty folder that is not a preprocess output is refused too
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  rc, cap = run(args(folder, other), capsys)
  assert rc == 2 and "not a preprocess output" in cap.err
  assert sorted(os.listdir(other)) == ["keep.txt"]


def test_changed_source_is_refused(folder, tmp_path, capsys):
  src = tmp_path / "src"
  write_folder(str(src))
  out = tmp_path / "out"
  encode_first_shard(src, out)
  make_image("RGB", (40, 40), 9).save(src / "n01_cat" / "new.png")
  rc, cap = run(args(src, out), capsys)
  assert rc == 2 and "file list differs" in cap.err


# ---------------------------------------------------------------------------- hosts, devices


def test_independent_processes_and_finalize(folder, arrayrecord_out, tmp_path, capsys):
  out = tmp_path / "out"
  rc, cap = run(args(folder, out, process_index=0, process_count=2), capsys)
  assert rc == 0 and "p0/2" in cap.out and "--finalize" in cap.out
  assert not (out / "metadata.json").exists()
  # shards 0 and 2 are process 0's
  assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == [
      "train-00000-of-00003.array_record", "train-00002-of-00003.array_record"]
  rc, cap = run(["--output", out, "--finalize"], capsys)
  assert rc == 2 and "not done" in cap.err
  rc, cap = run(args(folder, out, process_index=1, process_count=2), capsys)
  assert rc == 0 and "done: 6 examples" in cap.out  # the last process finalises
  assert_same_tree(out, arrayrecord_out)
  rc, cap = run(["--output", out, "--finalize"], capsys)  # idempotent
  assert rc == 0
  assert_same_tree(out, arrayrecord_out)


def test_two_devices_match_one(folder, arrayrecord_out, tmp_path):
  assert len(jax.local_devices()) == 1  # this process: one CPU device
  out = tmp_path / "out"
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-m", "deepflow_jax.preprocess",
                         *args(folder, out)], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "2 device(s) x 2 per batch" in proc.stdout
  assert_same_tree(out, arrayrecord_out)


# ---------------------------------------------------------------------------- TFDS


def test_tfds_missing_package_is_a_user_error(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  rc, cap = run(["--source=tfds:imagenet2012", f"--vae={VAE_DIR}", f"--output={tmp_path / 'o'}"],
                capsys)
  assert rc == 2 and "needs tensorflow-datasets" in cap.err
  assert not (tmp_path / "o").exists()


def test_tfds_mock_data(folder, expected, tmp_path, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data's own fake images need TensorFlow to be encoded (SkipDecoding returns
  # the encoded bytes), so the mocked data source serves our PNG/JPEG bytes instead.
  examples = []
  for i, rel in enumerate(ORDER):
    with open(os.path.join(folder, rel), "rb") as f:
      data = f.read()
    examples.append({"image": data, "label": np.int64(LABELS[i]),
                     "file_name": os.path.basename(rel)})

  def as_data_source(self, split, decoders=None, **kwargs):
    del self, kwargs
    assert split == "train" and "image" in decoders
    return examples

  out = tmp_path / "out"
  with tfds.testing.mock_data(num_examples=len(examples), as_data_source_fn=as_data_source):
    rc, cap = run(["--source=tfds:imagenet2012", f"--vae={VAE_DIR}", f"--output={out}",
                   f"--resolution={RES}", "--format=repa", "--examples_per_shard=4",
                   "--batch_size=2"], capsys)
  assert rc == 0, cap.err
  assert "imagenet2012/train[4]" in cap.err  # the corrupt one, by name
  src = RepaLatentSource(out)
  check_values(src, expected)
  settings = latent_writer.read_settings(str(out))
  assert settings["settings"]["num_classes"] == 1000
  assert settings["info"]["class_names"][:2] == ["n01440764", "n01443537"]


def test_tfds_unprepared_is_a_user_error(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  rc, cap = run(["--source=tfds:imagenet2012", f"--tfds_data_dir={tmp_path / 'tfds'}",
                 f"--vae={VAE_DIR}", f"--output={tmp_path / 'o'}"], capsys)
  assert rc == 2 and "not prepared" in cap.err and "array_record" in cap.err
  assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("argv,msg", [
    (["--source=folder:/x"], "--source must be"),
    (["--resolution=30"], "not a multiple of the VAE's downsampling factor 4"),
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--process_index=1"], "give both"),
])
def test_cli_errors(folder, tmp_path, capsys, argv, msg):
  base = args(folder, tmp_path / "o")
  keys = {a.split("=")[0] for a in argv}
  rc, cap = run([a for a in base if a.split("=")[0] not in keys] + argv, capsys)
  assert rc == 2 and msg in cap.err, cap.err


def test_coordinated_processes(folder, arrayrecord_out, tmp_path):
  """Two processes under jax.distributed: each writes its shards, process 0 finalises."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "out"
  env = cpu_env(1)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "deepflow_jax.preprocess", *args(folder, out), "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e
  assert "p0/2" in outs[0][0] and "done: 6 examples" in outs[0][0]
  assert "p1/2" in outs[1][0] and "done:" not in outs[1][0]
  assert_same_tree(out, arrayrecord_out)


def test_sigterm_keeps_finished_shards_and_the_rerun_completes(folder, arrayrecord_out, tmp_path,
                                                               capsys, monkeypatch):
  """SIGTERM after the first shard: exit 143, one line, finished shards kept, rerun = clean run."""
  finish = latent_writer.ShardWriter.finish
  calls = []

  def finish_then_sigterm(self):
    finish(self)
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the encoder's StopRequests

  monkeypatch.setattr(latent_writer.ShardWriter, "finish", finish_then_sigterm)
  out = tmp_path / "out"
  rc, cap = run(args(folder, out), capsys)
  assert rc == 143 and "SIGTERM" in cap.out and "rerun the same command" in cap.out
  assert "Traceback" not in cap.err
  assert not (out / "metadata.json").exists()
  assert not [n for n in os.listdir(out) if ".tmp" in n]  # the abandoned shard left nothing
  monkeypatch.setattr(latent_writer.ShardWriter, "finish", finish)
  rc, _ = run(args(folder, out), capsys)
  assert rc == 0
  assert tree_bytes(out) == tree_bytes(arrayrecord_out)
