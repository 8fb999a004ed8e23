"""Writing a latent dataset shard by shard, resumably: layouts, progress markers, final files.

Output formats (``OUT`` is the output folder)
---------------------------------------------
``arrayrecord`` (default): the project's schema (:mod:`deepflow_jax.data.records`):
``OUT/<split>-SSSSS-of-NNNNN.array_record`` shards (one per ``examples_per_shard``
consecutive source examples, records ``{mean, std, label, index}`` NHWC,
``group_size:1``) and ``OUT/metadata.json`` (``num_examples``, ``shards``,
``latent_shape``, ``num_classes``, ``resolution``, ``vae``, ``scaling_factor``,
``vae_downsampling`` and extras ``split``, ``source``, ``class_names``,
``num_source_examples``, ``num_skipped``, ``skipped``). A shard left with no
example (all of its images unreadable) is not listed. Read with
``data.name="arrayrecord", data.path=OUT``.

``repa``: the reference's layout: ``OUT/vae-sd/00000/img-mean-std-00000000.npy``
(float32 ``(2c, h, w)`` CHW, channels ``0..c-1`` the mean, ``c..2c-1`` the std;
1,000 files per folder, folder = index // 1000) and ``OUT/vae-sd/dataset.json``
``{"labels": [["00000/img-mean-std-00000000.npy", label], ...], "scaling_factor":
0.18215, "vae_downsampling": 8}`` (the last two are the encoding VAE's; the
reference's file has only ``labels``). Read with ``data.name="repa", data.path=OUT``.

With ``save_images`` the crops (uint8 ``(res, res, 3)``, what SSL alignment feeds
its image encoder) are stored too: ``repa``: as uncompressed PNGs,
``OUT/images/00000/img00000000.png``, with ``OUT/images/dataset.json`` keyed by
the PNG names (the reference's ``images/`` folder beside ``vae-sd/``);
``arrayrecord``: inside each record (the optional ``image`` field of
:mod:`deepflow_jax.data.records`, ``image_shape`` in ``metadata.json``), so one
read returns latents and image together.

Indices: example ``i`` is the ``i``-th entry of the source order. An unreadable
image is skipped and listed in the final summary (``progress/summary.json`` and,
for ArrayRecord, ``metadata.json``). Skipping never renumbers: every written
example keeps its source position as its index (ArrayRecord field ``index``;
REPA file number), so a skipped image leaves a gap and labels always travel with
their example.

Resumable state (the rules of :mod:`deepflow_jax.outputs`)
----------------------------------------------------------
``OUT/progress/settings.json`` is the folder's manifest: every setting that
determines the output (:func:`open_output`). A shard's files are written under
temporary names and renamed into place (the ArrayRecord shard as one file, REPA
files one by one), then the shard is marked done by
``progress/shard-SSSSS-of-NNNNN.json`` (its examples' indices and labels, its
skipped images). A shard without a marker is redone from scratch by whoever owns
it; the temporary files a killed run left for that shard are removed first.
The final files (``metadata.json`` / ``dataset.json``, ``progress/summary.json``)
are written by :func:`finalize`, last and atomically, once every shard is done:
a folder holding them is complete.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from array_record.python import array_record_module

from deepflow_jax import outputs
from deepflow_jax.data import records
from deepflow_jax.data.repa import REPA_FEATURE_DIR
from deepflow_jax.data.repa import REPA_LABEL_FILE
from deepflow_jax.errors import UserError
from deepflow_jax.models.vae import LATENT_SCALE

FORMAT_VERSION = "deepflow-jax/preprocess/v1"
ARRAYRECORD, REPA = "arrayrecord", "repa"
FORMATS = (ARRAYRECORD, REPA)
PROGRESS_DIR = "progress"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
FEATURE_DIR = REPA_FEATURE_DIR  # "vae-sd"
IMAGES_DIR = "images"
LABEL_FILE = REPA_LABEL_FILE  # "dataset.json"
FILES_PER_FOLDER = 1000
# Settings whose values are digests: the refusal message says what they stand for.
DIGEST_LABELS = {"source_digest": "the source's file list differs",
                 "vae_digest": "the VAE weights differ"}


def _print(line: str) -> None:
  print(line, flush=True)


# ----------------------------------------------------------------------------
# Layout.


def repa_feature_name(index: int) -> str:
  """``"00000/img-mean-std-00000000.npy"``: the reference's latent file of example ``index``."""
  return f"{index // FILES_PER_FOLDER:05d}/img-mean-std-{index:08d}.npy"


def repa_image_name(index: int) -> str:
  """``"00000/img00000000.png"``: the reference's image file of example ``index``."""
  return f"{index // FILES_PER_FOLDER:05d}/img{index:08d}.png"


def shard_range(shard: int, settings: dict) -> tuple[int, int]:
  """Source positions ``[start, stop)`` of ``shard``."""
  n, per = settings["num_source_examples"], settings["examples_per_shard"]
  return shard * per, min((shard + 1) * per, n)


def _marker_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, PROGRESS_DIR, f"shard-{shard:05d}-of-{num_shards:05d}.json")


def _shard_file(out: str, settings: dict, shard: int) -> str:
  return os.path.join(out, records.shard_name(settings["split"], shard, settings["num_shards"]))


# ----------------------------------------------------------------------------
# Settings and progress markers.


def output_folder(out: str) -> outputs.OutputFolder:
  """``out`` as a resumable folder whose manifest is ``progress/settings.json``."""
  return outputs.OutputFolder(
      out, manifest=f"{PROGRESS_DIR}/{SETTINGS_FILE}", format=FORMAT_VERSION,
      what="a preprocess output", format_key="format_version", info_key="info",
      labels=DIGEST_LABELS)


def read_settings(out: str) -> dict | None:
  """The document in ``OUT/progress/settings.json`` (``settings``, ``info``); None if absent."""
  return output_folder(out).read_manifest()


def open_output(out: str, settings: dict, info: dict) -> dict:
  """Records ``settings`` in a fresh output folder, or checks them against a previous run's.

  Returns the settings document on disk. Refuses (UserError, one line, nothing
  written) a folder holding other settings, or a non-empty folder that is not a
  preprocess output. Several processes may call it at once on a fresh folder.
  """
  doc, _ = output_folder(out).open(settings, info)
  return doc


def done_shards(out: str, settings: dict) -> dict[int, dict]:
  """``{shard: marker}`` for every finished shard (its marker, and its file for ArrayRecord)."""
  num = settings["num_shards"]
  done = {}
  for s in range(num):
    marker = outputs.finished_record(_marker_path(out, s, num))
    if marker is None:
      continue
    if settings["format"] == ARRAYRECORD and marker["examples"] and not os.path.isfile(
        _shard_file(out, settings, s)):
      continue  # the shard file was removed: redo it
    done[s] = marker
  return done


# ----------------------------------------------------------------------------
# Writing one shard.


class ShardWriter:
  """Receives one shard's examples in source order; :meth:`finish` publishes the shard.

  Creating it removes the temporary files an interrupted attempt at this shard
  left (and only this shard's: other processes may be writing theirs).
  """

  def __init__(self, out: str, settings: dict, shard: int):
    self.out, self.settings, self.shard = out, settings, shard
    self.start, self.stop = shard_range(shard, settings)
    self.pending = self.stop - self.start  # examples neither written nor skipped yet
    self.examples: list[list[int]] = []  # [index, label]
    self.skipped: list[list[Any]] = []  # [index, name, error]
    self.fmt = settings["format"]
    self.save_images = settings["save_images"]
    self.image_pngs = self.save_images and self.fmt == REPA  # else in the records
    self.marker = _marker_path(out, shard, settings["num_shards"])
    self._remove_stale_tmp()
    self._writer = None
    if self.fmt == ARRAYRECORD:
      self.path = _shard_file(out, settings, shard)
      self.tmp = outputs.tmp_name(self.path)
      self._writer = array_record_module.ArrayRecordWriter(self.tmp, "group_size:1")

  def _owned_files(self) -> set[str]:
    """Final paths of every file this shard writes."""
    files = {self.marker}
    if self.fmt == ARRAYRECORD:
      files.add(_shard_file(self.out, self.settings, self.shard))
    for sub, name, wanted in ((FEATURE_DIR, repa_feature_name, self.fmt == REPA),
                              (IMAGES_DIR, repa_image_name, self.image_pngs)):
      if wanted:
        files.update(os.path.join(self.out, sub, name(i)) for i in range(self.start, self.stop))
    return files

  def _remove_stale_tmp(self) -> None:
    owned = self._owned_files()
    for directory in sorted({os.path.dirname(p) for p in owned}):
      outputs.remove_stale_tmp(directory, owned=owned.__contains__)

  def _file(self, sub: str, name: str) -> str:
    path = os.path.join(self.out, sub, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def write(self, index: int, label: int, mean: np.ndarray, std: np.ndarray,
            crop: np.ndarray) -> None:
    """Stores example ``index``: mean/std float32 ``(h, w, c)``, crop uint8 ``(res, res, 3)``."""
    if self.fmt == ARRAYRECORD:
      self._writer.write(records.encode_record(mean, std, label, index,
                                               crop if self.save_images else None))
    else:
      moments = np.ascontiguousarray(np.concatenate([mean, std], -1).transpose(2, 0, 1),
                                     np.float32)
      outputs.atomic_save_npy(self._file(FEATURE_DIR, repa_feature_name(index)), moments)
    if self.image_pngs:
      outputs.atomic_save_png(self._file(IMAGES_DIR, repa_image_name(index)), crop,
                              compress_level=0)
    self.examples.append([int(index), int(label)])
    self.pending -= 1

  def skip(self, index: int, name: str, error: str) -> None:
    """Records example ``index`` as unreadable (``name`` and ``error`` for the summary)."""
    # A file of this index from an earlier, interrupted attempt must not survive.
    if self.fmt == REPA:
      outputs.remove_if_exists(os.path.join(self.out, FEATURE_DIR, repa_feature_name(index)))
    if self.image_pngs:
      outputs.remove_if_exists(os.path.join(self.out, IMAGES_DIR, repa_image_name(index)))
    self.skipped.append([int(index), name, error])
    self.pending -= 1

  def finish(self) -> None:
    """Publishes the shard: renames its file into place, then writes its marker."""
    assert self.pending == 0, self.pending
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.replace(self.tmp, self.path)
    outputs.mark_finished(self.marker, {
        "shard": self.shard, "start": self.start, "stop": self.stop,
        "examples": self.examples, "skipped": self.skipped})

  def abandon(self) -> None:
    """Stops without publishing; the shard stays unfinished (a rerun redoes it)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      outputs.remove_if_exists(self.tmp)


# ----------------------------------------------------------------------------
# Finalisation.


def finalize(out: str, doc: dict, *, log: Callable[[str], None] = _print,
             tag: str = "preprocess") -> list[int]:
  """Writes the final files if every shard is done; returns the missing shards.

  ArrayRecord: ``metadata.json`` (via the schema of :mod:`records`; with images
  ``image_shape``); REPA: ``vae-sd/dataset.json``, with images also
  ``images/dataset.json``; always
  ``progress/summary.json`` (counts and the skipped images). Idempotent. Lines
  go to ``log``, prefixed ``[tag]``.
  """
  settings, info = doc["settings"], doc.get("info", {})
  num = settings["num_shards"]
  done = done_shards(out, settings)
  missing = [s for s in range(num) if s not in done]
  if missing:
    return missing
  examples = [e for s in range(num) for e in done[s]["examples"]]
  skipped = [e for s in range(num) for e in done[s]["skipped"]]
  if not examples:
    raise UserError(f"{out}: every one of the {len(skipped)} images was unreadable; "
                    "nothing to write")
  latent_scale = info.get("scaling_factor", LATENT_SCALE)
  # image side / latent side: the encoding VAE's downsampling factor
  vae_downsampling = settings["resolution"] // settings["latent_shape"][0]
  if settings["format"] == ARRAYRECORD:
    names = [records.shard_name(settings["split"], s, num) for s in range(num)
             if done[s]["examples"]]
    records.write_metadata(
        out, num_examples=len(examples), shards=names, latent_shape=settings["latent_shape"],
        num_classes=settings["num_classes"], resolution=settings["resolution"],
        vae=info.get("vae", ""), latent_scale=latent_scale,
        image_shape=([settings["resolution"]] * 2 + [3]) if settings["save_images"] else None,
        extra={
            "split": settings["split"], "source": settings["source"],
            "class_names": info.get("class_names"),
            "num_source_examples": settings["num_source_examples"],
            "num_skipped": len(skipped), "skipped": [name for _, name, _ in skipped],
            "index": "the example's position in the source order (skipped images leave gaps)",
            "vae_downsampling": vae_downsampling,
        })
  else:
    labels = {"labels": [[repa_feature_name(i), l] for i, l in examples],
              "scaling_factor": latent_scale, "vae_downsampling": vae_downsampling}
    outputs.atomic_write_json(os.path.join(out, FEATURE_DIR, LABEL_FILE), labels)
  if settings["save_images"] and settings["format"] == REPA:
    labels = {"labels": [[repa_image_name(i), l] for i, l in examples]}
    os.makedirs(os.path.join(out, IMAGES_DIR), exist_ok=True)
    outputs.atomic_write_json(os.path.join(out, IMAGES_DIR, LABEL_FILE), labels)
  summary = {"num_source_examples": settings["num_source_examples"],
             "num_written": len(examples), "num_skipped": len(skipped),
             "skipped": [{"index": i, "name": n, "error": err} for i, n, err in skipped]}
  outputs.atomic_write_json(os.path.join(out, PROGRESS_DIR, SUMMARY_FILE), summary)
  log(f"[{tag}] done: {len(examples)} examples written to {out} ({settings['format']}), "
      f"{len(skipped)} unreadable image(s) skipped")
  if skipped:
    shown = ", ".join(n for _, n, _ in skipped[:20])
    more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    log(f"[{tag}] skipped: {shown}{more} (full list with errors: {PROGRESS_DIR}/{SUMMARY_FILE})")
  return []


def finalize_output(out: str, *, log: Callable[[str], None] = _print) -> None:
  """Writes the final files of a finished multi-process run in ``out``.

  Raises UserError (one line) when ``out`` holds no preprocess settings or some
  shards are not done yet (the first few are named).
  """
  out = os.path.abspath(out)
  doc = read_settings(out)
  if doc is None:
    raise UserError(f"--output {out}: no {PROGRESS_DIR}/{SETTINGS_FILE}; nothing to finalize")
  missing = finalize(out, doc, log=log)
  if missing:
    raise UserError(f"{out}: {len(missing)} of {doc['settings']['num_shards']} shards are not "
                    f"done (first: {missing[:5]}); run the missing processes first")
