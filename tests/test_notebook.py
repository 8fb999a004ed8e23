"""docs/colab.ipynb executed top to bottom on CPU, as CI runs it, so the notebook cannot rot.

The notebook runs in a Jupyter kernel of this interpreter (a kernelspec written into a
temporary folder, so no installed spec can point elsewhere) with
``DEEPFLOW_NOTEBOOK_SMALL=1`` (tiny model, few steps) and two forced host devices, so
training and sampling really run sharded. A cell that raises fails the test
(``nbclient`` raises ``CellExecutionError``). Then the executed notebook and the files
it wrote are checked: the class grid and the loss plot are images, the second training
call resumed from the first one's checkpoint instead of starting over, and a reference
checkpoint given by path is converted exactly.

Cost: 2 min 26 s of CPU time for this file with a cold JAX compilation cache (so about
that, or less, on an idle 2-core CI machine); measured 4 min 45 s wall on the 2-core
development machine shared at load ~8, and 75 s with a warm cache. The compilation
cache is ``JAX_COMPILATION_CACHE_DIR`` or ``.pytest_cache/jax_cache``, as in test_train.
"""
import base64
import io
import json
import os

import jax
import nbclient
import nbformat
import numpy as np
from ipykernel import kernelspec
from PIL import Image

from conftest import xla_flags
from deepflow_jax.convert import load_torch_checkpoint
from deepflow_jax.models import loading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTEBOOK = os.path.join(ROOT, "docs", "colab.ipynb")
TINY2T_PT = os.path.join(HERE, "data", "tiny2t.pt")
VAE_TINY = os.path.join(HERE, "data", "vae_tiny")
KERNEL = "deepflow-jax-test"
# What the notebook's small settings train to (its FIRST_STEPS, FINAL_STEPS, log_every).
FIRST_STEPS, FINAL_STEPS, LOG_EVERY = 10, 20, 2


def execute(tmp_path, monkeypatch, *, until=None, **env):
  """Runs the notebook (its cells up to the one with id ``until``); returns it with outputs."""
  spec_root = tmp_path / "jupyter"
  kernelspec.write_kernel_spec(spec_root / "kernels" / KERNEL)  # argv: this sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(spec_root))
  # The kernel's connection file, IPython's profile and matplotlib's cache go under tmp_path,
  # not $HOME: the suite must pass with a read-only home directory.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
  monkeypatch.setenv("DEEPFLOW_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR",
                     os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                    os.path.join(ROOT, ".pytest_cache", "jax_cache")))
  for k, v in env.items():
    monkeypatch.setenv(k, str(v))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  if until is not None:
    ids = [c.get("id") for c in nb.cells]
    nb.cells = nb.cells[:ids.index(until) + 1]
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=180,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  return {c.get("id"): c for c in nb.cells}


def text_of(cell):
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out["text"])
    elif "data" in out and "text/plain" in out["data"]:
      parts.append(out["data"]["text/plain"])
  return "".join(parts)


def images_of(cell):
  return [Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"])))
          for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def shown_size(width, height, rows, cols, pad=2, target=512):
  """The size of a ``rows x cols`` grid of (width x height) tiles as the notebook shows it."""
  w, h = cols * (width + pad) + pad, rows * (height + pad) + pad
  scale = max(1, target // w)
  return (w * scale, h * scale)


def num_colours(image):
  pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
  return len(np.unique(pixels, axis=0))


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.get("id")


def test_notebook_trains_resumes_and_samples(tmp_path, monkeypatch):
  out_dir = tmp_path / "out"
  cells = execute(tmp_path, monkeypatch, DEEPFLOW_NOTEBOOK_DIR=out_dir)

  assert "nothing to install" in text_of(cells["install"])  # CI has no network: no pip run
  assert "2 device(s)" in text_of(cells["devices"])
  assert "RANDOMLY INITIALISED" in text_of(cells["convert"])
  # The class grid: 3 classes x 2 samples of 8x8 latents.
  (grid,) = images_of(cells["sample"])
  assert grid.size == shown_size(8, 8, rows=3, cols=2)
  assert num_colours(grid) > 10  # blank or constant tiles would give 2 (tile + white gaps)

  workdir = out_dir / "digits"
  assert len(images_of(cells["train"])) == 2  # the live loss plot and the EMA sample grid
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [
      10, 15, 20]  # ckpt_every=5, keep 3
  # metrics.jsonl has every logged step of both calls once: the second call continued from
  # the first one's checkpoint instead of starting again at step 2.
  with open(workdir / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(LOG_EVERY, FINAL_STEPS + 1, LOG_EVERY))
  resume = text_of(cells["resume"])
  assert f"resumed from {workdir}/checkpoints/{FIRST_STEPS}" in resume
  assert f"the first step logged by this run is {FIRST_STEPS + LOG_EVERY}" in resume
  with open(workdir / "config.json") as f:
    assert json.load(f)["train"]["num_steps"] == FINAL_STEPS
  with open(workdir / "config.1.json") as f:  # the first call's config, kept
    assert json.load(f)["train"]["num_steps"] == FIRST_STEPS
  # Samples of the trained digits model loaded back from the workdir: 10 rows of 2 digits.
  (digits,) = images_of(cells["reload"])
  assert digits.size == shown_size(8, 8, rows=10, cols=2, target=320)


def test_notebook_converts_a_reference_checkpoint(tmp_path, monkeypatch):
  out_dir = tmp_path / "out"
  cells = execute(tmp_path, monkeypatch, until="sample", DEEPFLOW_NOTEBOOK_DIR=out_dir,
                  DEEPFLOW_NOTEBOOK_CHECKPOINT=TINY2T_PT, DEEPFLOW_NOTEBOOK_VAE=VAE_TINY)
  converted = out_dir / "converted" / "tiny2t"
  assert f"-> {converted}" in text_of(cells["convert"])
  model, params = loading.load_converted(str(converted))
  ref_model, ref_params = load_torch_checkpoint(TINY2T_PT, "ema")
  assert loading.model_to_dict(model) == loading.model_to_dict(ref_model)
  # Conversion is a rename and transposes: exact.
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # Decoded by the tiny VAE (4x upsampling): 3 x 2 RGB pictures of 32x32; the latent
  # fallback would show 8x8 tiles.
  (grid,) = images_of(cells["sample"])
  assert grid.mode == "RGB" and grid.size == shown_size(32, 32, rows=3, cols=2)
  assert num_colours(grid) > 10
