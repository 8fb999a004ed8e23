"""The training loop: what ``python -m deepflow_jax.main`` runs, callable from a notebook.

    from deepflow_jax import config_lib, training
    config = config_lib.load_config("digits", **{"train.num_steps": 300})
    status = training.train(config, "runs/digits", callback=lambda step, m: print(step, m))
    for metrics in training.iterate_training(config, "runs/digits"):   # the same, as an iterator
      ...

Runs on every device of every host (a ``("data", "fsdp")`` mesh from the
config), resumes from the newest checkpoint in the workdir by itself, saves on
SIGTERM (preemption) and returns. The loop itself only steps, logs metrics and
saves checkpoints; ``training.startup`` prepares the run, ``training.hooks``
are the periodic actions (checkpoints, sample grids, FID, the digits
evaluation), ``training.meter`` measures throughput. The workdir's layout is
``deepflow_jax.workdir``'s.

Return status: 0 when the run finished, 143 / 130 after a SIGTERM / SIGINT save
(143 also for a multi-host preemption). Steps whose loss or gradients are not
finite are skipped inside the step; a diverged run rolls back to its newest
finite checkpoint and, after ``train.max_rollbacks`` rollbacks without
progress, raises ``errors.Diverged`` (exit 3; ``training.health``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import jax

from deepflow_jax import config_lib
from deepflow_jax import sampling
from deepflow_jax import sharding as shd
from deepflow_jax.errors import Diverged
from deepflow_jax.signals import StopRequests
from deepflow_jax.training import hooks as hooks_lib
from deepflow_jax.training import startup
from deepflow_jax.training.health import DivergencePolicy
from deepflow_jax.training.meter import Meter

EXIT_PREEMPTED = 143


def _stop_status(run: startup.Run, step: int) -> Optional[int]:
  """The exit status when the run must stop after ``step`` (a signal, a pod preemption)."""
  if run.signals.requested:
    return run.signals.exit_status
  if jax.process_count() > 1 and run.ckpt.manager.reached_preemption(step):
    return EXIT_PREEMPTED
  return None


def _stop(run: startup.Run, ckpt: hooks_lib.CheckpointHook, step: int, state, status: int) -> int:
  """Saves the state (unless no step was taken: nothing new) and says how to resume."""
  if step > run.step:
    ckpt.save(step, state, force=True)
  run.ckpt.close()
  where = (f"saved step {step} to {run.ckpt.directory}" if step > run.step else
           f"stopped before the first step of this run (at step {step}), nothing new to save")
  run.log(run.signals.message("train", f"{where}; rerun the same command to resume")
          if run.signals.requested else f"preempted: {where}; exiting")
  return status


def _logged(run: startup.Run, meter: Meter, step: int, metrics) -> dict[str, float]:
  """A logged step's metrics (device values fetched, throughput added), written and printed."""
  out = {k: float(v) for k, v in jax.device_get(metrics).items()}
  out.update(meter.measure(step))
  run.writer.scalars(step, out)
  run.log(meter.line(step, out, proj=run.model.ssl_align))
  return {"step": step, **out}


def _newest_finite_checkpoint(run: startup.Run) -> tuple[Optional[int], Any]:
  """(step, state) of the newest checkpoint whose parameters and EMA are finite, or (None,
  None); newer ones that are not (or cannot be read) are set aside, not deleted."""
  run.ckpt.wait()
  bad = []
  found = (None, None)
  for s in reversed(run.ckpt.all_steps()):
    try:
      state = run.ckpt.restore_state(s, run.trainer.abstract_state)
    except Exception:  # pylint: disable=broad-except  # Orbax raises many types
      state = None
    if state is not None and run.trainer.state_is_finite(state):
      found = (s, state)
      break
    bad.append(s)
  if bad:
    run.ckpt.set_aside(bad)
  return found


def _roll_back(run: startup.Run, ckpt: hooks_lib.CheckpointHook, policy: DivergencePolicy,
               step: int, reason: str) -> tuple[Any, int]:
  """Restores the newest finite checkpoint (else the step-0 state), keeping the data iterator
  past the batches that led to ``step``; raises ``Diverged`` when no rollback is left."""
  if not policy.diverged(step):
    run.ckpt.wait()
    last = run.ckpt.latest_step()
    where = (f"step {last} in {run.ckpt.directory}" if last is not None else
             "none yet, a rerun starts afresh")
    raise Diverged(f"training diverged at step {step} ({reason}) after "
                   f"{policy.max_rollbacks} rollback(s) without progress (last good checkpoint: "
                   f"{where}); change the settings (e.g. optim.learning_rate) and rerun to "
                   "resume")
  good, state = _newest_finite_checkpoint(run)
  ckpt.last_saved = -1 if good is None else good
  source = f"{run.ckpt.directory}/{good}"
  if good is None:
    good, source = 0, "the initial state"
    state = startup.fresh_state(run.config, run.trainer, lambda msg: None)
  run.log(f"WARNING: diverged at step {step} ({reason}); rolled back to step {good} "
          f"({source}), skipping the {step - good} batches read since (rollback "
          f"{policy.rollbacks} of {policy.max_rollbacks})")
  return state, good


def _steps(run: startup.Run, ckpt: hooks_lib.CheckpointHook, hooks: list[hooks_lib.Hook]):
  """Trains from ``run.step`` to ``train.num_steps``, yielding every logged step's metrics.

  Returns ``(status, state, step)``: status None when every step is done, else
  the exit status of a stop (the state saved). Divergence (``training.health``)
  rolls back or raises ``Diverged``.
  """
  t = run.config.train
  num_steps, log_every = int(t.num_steps), int(t.log_every)
  state, step = run.state, run.step
  meter = Meter(run.model, int(t.global_batch_size), num_steps, step)
  policy = DivergencePolicy.from_config(run.config)
  save_due = False  # a checkpoint waits for the end of a skip streak
  status = _stop_status(run, step)  # a signal during start-up: stop before compiling the step
  while status is None and step < num_steps:
    t0 = time.perf_counter()
    batch = next(run.data_it)
    meter.data_wait(time.perf_counter() - t0)
    state, metrics = run.trainer.step(state, run.trainer.global_batch(batch))
    step += 1
    meter.step_done()
    reason = None
    if step % log_every == 0 or step == num_steps:
      out = _logged(run, meter, step, metrics)
      yield out
      reason = policy.check(step, loss=out["loss"], skip_streak=int(out["skip_streak"]))
    save_due = save_due or ckpt.due(step)
    if reason is None and step < num_steps and save_due:
      # The last step's checkpoint and hooks are _finish's. A save due during a skip
      # streak waits for the first good step (asked each step until then); a state
      # that is not finite is never saved.
      streak = int(state.skip_streak)
      reason = policy.check(step, skip_streak=streak)
      if reason is None and streak == 0:
        save_due = False
        if not ckpt.save(step, state):
          reason = policy.check(step, finite_state=False)
    if reason is not None:
      state, step = _roll_back(run, ckpt, policy, step, reason)
      meter = Meter(run.model, int(t.global_batch_size), num_steps, step)
      save_due = False
    elif step < num_steps:
      try:  # a signal during these stops them (StopSampling); the check below then saves
        for m in hooks_lib.run_hooks(hooks, step, state, final=False, log=run.log):
          run.writer.scalars(step, m)
          yield {"step": step, **m}
      except sampling.StopSampling:
        pass
    status = _stop_status(run, step)
  if status is not None:
    return _stop(run, ckpt, step, state, status), state, step
  return None, state, step


def _finish(run: startup.Run, ckpt: hooks_lib.CheckpointHook, hooks: list[hooks_lib.Hook],
            state, step: int):
  """The final checkpoint, then the end-of-run hooks (grid, FID, digits evaluation)."""
  ckpt.save(step, state, force=True)
  run.ckpt.close()
  run.log(f"[train] {step} steps done; final checkpoint in {run.ckpt.directory}")
  try:
    for m in hooks_lib.run_hooks(hooks, step, state, final=True, log=run.log):
      run.writer.scalars(step, m)
      yield {"step": step, **m}
  except sampling.StopSampling:
    run.log(run.signals.message("train", "end-of-run sampling/evaluation stopped; the final "
                                "checkpoint is saved, rerun the same command to redo them"))
    return run.signals.exit_status
  run.log(f"done: {step} steps in {run.workdir}")
  return 0


def iterate_training(config, workdir: str, *, log: Optional[Callable[[str], None]] = None
                     ) -> Iterator[dict[str, float]]:
  """Trains with ``config`` in ``workdir``, yielding the metrics of every logged step.

  Each yielded dict holds ``step`` and the losses, gradient norm, learning rate
  and throughput of the last ``train.log_every`` steps (what the progress line
  shows), or the ``eval/...`` metrics of an evaluation. The generator's return
  value (``StopIteration.value``) is the exit status: 0 when finished, 143 / 130
  after a SIGTERM / SIGINT save. Closing the generator early waits for pending
  checkpoint writes.
  """
  config_lib.validate(config)
  shd.maybe_initialize_distributed(config)
  if log is None:
    log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
  # Multi-process: SIGTERM goes to JAX's preemption notifier (_stop_status).
  with StopRequests(sigterm=jax.process_count() == 1) as signals:
    run = startup.prepare(config, workdir, log, signals)
    try:
      ckpt, hooks = hooks_lib.make_hooks(run)
      status, state, step = yield from _steps(run, ckpt, hooks)
      if status is None:
        status = yield from _finish(run, ckpt, hooks, state, step)
      return status
    finally:
      run.close()


def train(config, workdir: str, *, callback: Optional[Callable[[int, dict], Any]] = None,
          log: Optional[Callable[[str], None]] = None) -> int:
  """Trains with ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the status.

  ``callback(step, metrics)`` is called at every logged step (and with the
  ``eval/...`` metrics of every evaluation). Returns 0 when the run finished,
  143 / 130 after a SIGTERM / SIGINT save.
  """
  it = iterate_training(config, workdir, log=log)
  while True:
    try:
      metrics = next(it)
    except StopIteration as stop:
      return int(stop.value or 0)
    if callback is not None:
      callback(int(metrics["step"]), metrics)
