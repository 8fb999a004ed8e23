"""Performance options: rematerialisation, the persistent compilation cache, 512 fine-tuning.

* ``model.remat`` ("block", "dots") changes what the backward pass keeps, never the
  parameter tree, the loss or the gradients;
* the compilation cache goes to ``WORKDIR/.jax_cache`` by default, and a restarted run
  loads its train step from there instead of compiling it;
* weights of a 256-pixel model (input 32) initialise a 512-pixel one (input 64): the
  sin-cos positions are recomputed for the new grid, nothing else changes shape. Here a
  tiny model at 8 -> 16, from a converted checkpoint and from a training workdir.
"""
import os
import re
import subprocess

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_env, main_command
from conftest import restore_state
from deepflow_jax import config_lib
from deepflow_jax import losses
from deepflow_jax.training import startup
from deepflow_jax.models import loading
from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.deepflow import sincos_pos_embed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIGITS = os.path.join(ROOT, "configs", "digits.py")
TINY = dict(input_size=8, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=10,
            df_idxs=(1, 2), projector_dim=32)
SMALL = dict(TINY, depth=2, df_idxs=(1,))  # two branches: fewer arrays to compile
TINY_FLAGS = [
    "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.df_idxs=(1,)", "--config.model.projector_dim=32",
    "--config.loss.scale_weight=(0.2,1.0)", "--config.train.global_batch_size=16",
    "--config.train.log_every=1", "--config.sample.grid_classes=0", "--config.eval.num_samples=0",
    "--config.optim.warmup_steps=0",
]


def _dummy(model, n):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, model.input_size, model.input_size, model.in_channels)),
                  jnp.float32)
  return x, jnp.asarray(rng.integers(0, model.num_classes, n), jnp.int32)


def _loss_and_grads(model, params, x0, y):
  draws = losses.draw_loss_randomness(jax.random.key(1), x0.shape, model.num_branches,
                                      "lognormal")
  cfg = losses.LossConfig(scale_weight=(0.2,) * (model.num_branches - 1) + (1.0,))

  def loss(p):
    def apply_fn(x, t, y):
      return model.apply({"params": p}, x, t, y, train=True,
                         rngs={"label_dropout": jax.random.key(2)})
    return losses.deepflow_loss(apply_fn, x0, y, draws, cfg)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_keeps_parameters_loss_and_gradients():
  plain = DeepFlow(**SMALL)
  p_plain = loading.init_params(plain, seed=0)
  flat_a = flax.traverse_util.flatten_dict(p_plain, sep="/")
  assert "blocks_0/attn/qkv/kernel" in flat_a and "df_blocks_0/acc_mlp/layers_6/kernel" in flat_a
  # Non-zero heads and modulations, so every path carries gradient.
  leaves, tree = jax.tree.flatten(p_plain)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape)
                                     for l, k in zip(leaves, keys)])
  x0, y = _dummy(plain, 4)
  loss_a, g_a = _loss_and_grads(plain, params, x0, y)
  for policy in ("block", "dots"):
    remat = DeepFlow(**SMALL, remat=policy)
    # Same tree (names, shapes) and the same initial values: conversion and checkpoints
    # see no difference.
    flat_b = flax.traverse_util.flatten_dict(loading.init_params(remat, seed=0), sep="/")
    assert sorted(flat_a) == sorted(flat_b)
    for k in flat_a:
      np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    loss_b, g_b = _loss_and_grads(remat, params, x0, y)
    # float32 noise: recomputation may fuse differently (~1e-7 relative per op); a real
    # difference (a dropped or doubled path) is O(1) relative.
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5, err_msg=policy)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_a)[0], jax.tree.leaves(g_b)):
      scale = float(np.abs(a).max()) + 1e-12
      assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-4 * scale, (policy, path)


def test_remat_is_validated():
  c = config_lib.load_config(DIGITS, **{"model.remat": "all"})
  with pytest.raises(Exception, match="model.remat='all' is not one of"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="remat='all'"):
    loading.init_params(DeepFlow(**TINY, remat="all"))
  c = config_lib.load_config(DIGITS, **{"model.remat": "dots"})
  assert loading.model_from_config(c).remat == "dots"


def test_compilation_cache_location(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  c = config_lib.load_config(DIGITS)
  wd = str(tmp_path / "wd")
  assert startup.compilation_cache_dir(c, wd) == os.path.join(wd, ".jax_cache")
  c.train.compile_cache_dir = "none"
  assert startup.compilation_cache_dir(c, wd) is None
  c.train.compile_cache_dir = str(tmp_path / "shared_cache")
  assert startup.compilation_cache_dir(c, wd) == str(tmp_path / "shared_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/env")  # an explicit variable wins
  assert startup.compilation_cache_dir(c, wd) == "/from/env"
  (tmp_path / "file").write_text("x")
  c = config_lib.load_config(DIGITS, **{"train.compile_cache_dir": str(tmp_path / "file")})
  with pytest.raises(Exception, match="train.compile_cache_dir=.* is not a directory"):
    config_lib.validate(c)


def _env():
  env = dict(cpu_env(1), JAX_LOG_COMPILES="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own default location is tested
  return env


def _main(workdir, *flags, timeout=300, kill_at=None):
  """``python -m deepflow_jax.main`` (``kill_at``: ``tests/sigkill_worker.py``, which SIGKILLs
  itself after that step, once the newest checkpoint before it is saved)."""
  merged = dict(f.split("=", 1) for f in (*TINY_FLAGS, *flags))
  cmd = [*main_command(kill_at), f"--config={DIGITS}", f"--workdir={workdir}",
         *(f"{k}={v}" for k, v in merged.items())]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                        cwd=ROOT)


def test_restart_hits_the_cache_and_a_workdir_starts_a_larger_input_size(tmp_path):
  """Restart: the train step comes from WORKDIR/.jax_cache; then 8 -> 16 fine-tuning."""
  wd = tmp_path / "run"
  flags = ["--config.train.num_steps=3", "--config.train.ckpt_every=1"]
  r = _main(wd, *flags, kill_at=2)
  assert r.returncode == -9, r.stderr[-3000:]  # killed after step 2; step 1 is saved
  cache = wd / ".jax_cache"
  assert f"compilation cache: {cache}" in r.stdout
  assert os.listdir(cache)  # the initialiser and the train step were stored
  r = _main(wd, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "step 3/3" in r.stdout
  # JAX_LOG_COMPILES=1 makes JAX log persistent-cache hits as warnings.
  assert re.search(r"Persistent compilation cache hit for 'jit__?train_step'", r.stderr), (
      r.stderr[-3000:])

  # That input-8 workdir (its newest EMA weights) initialises a run at input 16.
  _, ema = loading.load_workdir_ema(str(wd))
  dst = tmp_path / "dst"
  r = _main(dst, "--config.train.num_steps=1", "--config.train.ckpt_every=1",
            "--config.model.input_size=16", "--config.data.image_size=16",
            "--config.optim.learning_rate=0", f"--config.train.init_from={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"initialised from {wd}" in r.stdout
  # Learning rate 0: the new run's parameters after its step are the old run's EMA weights.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restore_state(dst, 1)["params"], jax.device_get(ema))


def test_weights_of_a_smaller_input_size_run_with_their_own_positions():
  """Input-8 weights in an input-16 model: every shape fits, positions are the 8x8-token grid."""
  small = DeepFlow(**TINY)
  big = DeepFlow(**{**TINY, "input_size": 16})
  assert big.num_tokens == 4 * small.num_tokens
  assert loading.param_shapes(big) == loading.param_shapes(small)
  # The shipped 512 preset against the 256 one: 1,024 tokens, the same parameter shapes.
  shapes = {}
  for arg in ("", ":512"):
    cfg = config_lib.load_config(os.path.join(ROOT, "configs", "xl3t.py") + arg,
                                 **{"data.path": "/unused"})
    config_lib.validate(cfg)
    shapes[arg] = loading.param_shapes(loading.model_from_config(cfg))
  assert loading.model_from_config(cfg).num_tokens == 1024
  assert shapes[":512"] == shapes[""]
  params = loading.init_params(small, seed=5)
  x, y = _dummy(big, 2)
  _, inter = big.apply({"params": params}, x, [jnp.full((2,), 0.5)] * 3, y,
                       mutable=["intermediates"])
  s = np.asarray(inter["intermediates"]["patch_tokens"][0])
  patch = np.asarray(big.apply({"params": params}, x, method=lambda m, x: m.x_embedder(x)))
  # float32 sum of two O(1) values read back exactly up to rounding.
  np.testing.assert_allclose(s - patch, np.broadcast_to(sincos_pos_embed(32, 8), s.shape),
                             atol=1e-6)

