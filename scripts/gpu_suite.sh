#!/usr/bin/env bash
# One prepared accelerator run (docs/benchmarks.md): every benchmark of the performance
# work on one H100/H200, in priority order, each stage under its own `timeout`, the whole
# suite inside SUITE_BUDGET_S (default 470 s, under 8 minutes with the machine's start
# excluded). Results are appended as they come to
#   $OUT/gpu_suite.md     a markdown table (one row per stage, for docs/benchmarks.md)
#   $OUT/gpu_suite.jsonl  each stage's last JSON line, tagged with the stage name
#   $OUT/gpu_suite.log    every stage's full output
#   $OUT/profile.trace.json.gz  a jax.profiler trace of 3 XL/2-3T b256 steps (Perfetto)
# Nothing is downloaded: the data is generated (scripts/bench_data.py's fake REPA
# layout), the weights are random.
#
# Stages (priority order): env check; XL/2-3T train step b256 (attention auto =
# cuDNN where it runs) with peak memory and a profile; `main` for 60 steps on a generated
# REPA-layout folder, killed at step 40 and restarted (start and restart times, steady
# img/s, MFU, data wait, peak memory); sampling bf16 and float32 (first result time,
# s/step); the reference PyTorch code on the same card when UPSTREAM_DIR is set (train
# b256 and b32, sampling); train b256 with XLA attention; b32 cuDNN and XLA; remat block
# and dots at b256; the fresh-state program with and without -O0; the largest per-device
# batch on an 80 GB card at 256 and 512 pixels; bf16-vs-float32 sampling difference of a
# random XL/2-3T; the 512 train step.
#
# Run on the device machine (repository root):
#   bash scripts/gpu_suite.sh
# with, where the reference code is checked out beside the repository:
#   UPSTREAM_DIR=/path/to/DeepFlow REF_BENCH=/path/to/torch_ref_bench.py bash scripts/gpu_suite.sh
# (REF_BENCH defaults to ../shared/tools/torch_ref_bench.py; nothing from ../shared is
# part of this repository: on a machine that only gets the repository, carry the file in
# an ignored folder and point REF_BENCH at it.)
#
# The device machine has jax (CUDA), flax, optax, orbax, torch, numpy, scipy, pillow,
# scikit-learn, absl, etils, protobuf, cloudpickle, but not grain, array-record, dm-tree,
# portpicker, ml-collections, clu, tensorboardX. Fetch their wheels HERE, once, into the
# ignored folder .whl (CPython 3.12, manylinux x86-64; the versions of the project's venv):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 \
#     dm-tree==0.1.10 portpicker==1.6.0 ml-collections==1.1.0 clu==0.0.12 \
#     tensorboardX==2.6.5
# (add wrapt, psutil, PyYAML, attrs the same way if the env check below reports them
# missing), and pass carry=[".whl"] to the device tool; this script installs them with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# and puts /tmp/site and the repository on PYTHONPATH.
#
# CPU dry run (tiny model and sizes, every stage, < 3 minutes on 2 cores):
#   GPU_SUITE_DRY_RUN=1 OUT=/tmp/suite bash scripts/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_suite_out}
mkdir -p "$OUT"
DRY=${GPU_SUITE_DRY_RUN:-0}
BUDGET=${SUITE_BUDGET_S:-470}
WORK=${GPU_SUITE_WORK:-/tmp/gpu_suite_work}
rm -rf "$WORK" && mkdir -p "$WORK"
MD=$OUT/gpu_suite.md
JSONL=$OUT/gpu_suite.jsonl
LOG=$OUT/gpu_suite.log
: > "$JSONL"; : > "$LOG"
START=$(date +%s)
PY=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed" >> "$LOG"
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# One compilation cache for the whole suite (bench_startup uses the workdir's own).
export JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # Compile fast (XLA's CPU compile time dominates a tiny model's stages).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  XL=(--override model.hidden_size=64 model.depth=2 model.num_heads=2 "model.df_idxs=(1,)"
      model.projector_dim=64 model.input_size=8 model.num_classes=10 data.num_classes=10
      "loss.scale_weight=(0.2,1.0)")
  XL512=(--override model.hidden_size=64 model.depth=2 model.num_heads=2 "model.df_idxs=(1,)"
         model.projector_dim=64 model.input_size=16 model.num_classes=10 data.num_classes=10
         "loss.scale_weight=(0.2,1.0)")
  SAMP=(--hidden_size=64 --depth=2 --num_heads=2 --df_idxs=1 --projector_dim=64 --input_size=8
        --num_classes=10)
  B256=8; B32=4; STEPS=2; WARM=1; SAMPLE_BATCH=4; SAMPLE_STEPS=sde:10; MAIN_STEPS=6; KILL=4
  CKPT=2; FAKE=64; MEM_GB=0.012; HEADROOM=0; PROBE="4 8"; PREC=(--checkpoint=tests/data/tiny2t.pt
  --samplers=sde:20 --cfg_scales=1.0 --num_samples=8); REF_SIZE=(--hidden 64 --depth 2
  --splits "[1]" --latent 8); T=1
else
  XL=(); XL512=()
  SAMP=()
  B256=256; B32=32; STEPS=10; WARM=2; SAMPLE_BATCH=64; SAMPLE_STEPS=sde:50; MAIN_STEPS=60
  KILL=40; CKPT=30; FAKE=4096; MEM_GB=80; HEADROOM=2; PROBE="16 32"; PREC=(--preset=DeepFlow-XL/2-3T
  --input_size=32 --samplers=sde:100 --cfg_scales=1.0 --num_samples=32); REF_SIZE=(); T=1
fi

# stage NAME MAX_SECONDS CMD...: runs under `timeout` (capped by what is left of the
# budget), appends its output to the log and its last JSON line to the jsonl file.
stage() {
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: suite budget spent | | |" >> "$MD"; return
  fi
  local lim=$(( max < left ? max : left ))
  echo "===== $name (limit ${lim}s) $(date -u +%H:%M:%S)" >> "$LOG"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$lim" "$@" > "$WORK/$name.out" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  cat "$WORK/$name.out" >> "$LOG"
  $PY - "$name" "$rc" "$dt" "$WORK/$name.out" "$JSONL" "$MD" <<'EOF'
import json, sys
name, rc, dt, out, jsonl, md = sys.argv[1:]
last = None  # every JSON line of the output merged, later keys winning
for line in open(out, errors="replace"):
  line = line.strip()
  if line.startswith("{") and line.endswith("}"):
    try:
      last = {**(last or {}), **json.loads(line)}
    except ValueError:
      pass
status = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"exit {rc}")
with open(jsonl, "a") as f:
  f.write(json.dumps({"stage": name, "status": status, "seconds": int(dt), "result": last}) + "\n")
def fmt(d):
  if not isinstance(d, dict):
    return ""
  keys = ("images_per_s", "steps_per_s", "mfu_percent", "step_memory_gib", "peak_memory_gib",
          "compile_s", "samples_per_s", "seconds_per_batch", "first_call_s (compile+run)",
          "init_s", "step_s", "peak_mem_gb", "s_per_step", "ratio", "max_per_device_batch",
          "per_example_gb", "fixed_gb", "verified")
  parts = [f"{k}={d[k]}" for k in keys if k in d and d[k] is not None]
  for sub in ("first_start", "restart"):
    if isinstance(d.get(sub), dict):
      r = d[sub]
      tp = r.get("throughput", {})
      text = f"{sub}: {r.get('to_first_step_s', 0):.1f} s to its first step"
      if "images_per_sec" in tp:
        text += f", {tp['images_per_sec']:.1f} img/s, data {tp.get('data_wait_ms', 0):.1f} ms/step"
      if "mfu" in tp:
        text += f", MFU {100 * tp['mfu']:.1f}%"
      if "peak_memory_gib" in tp:
        text += f", peak {tp['peak_memory_gib']:.1f} GiB"
      parts.append(text)
  if "init_options" in d:
    parts.append("init: " + "; ".join(f"{k} compile {v['compile_s']} s run {v['run_s']} s"
                                      for k, v in d["init_options"].items()))
  if "latents" in d:
    parts.append("; ".join(f"{r['sampler']}:{r['steps']} cfg {r['cfg_scale']}: rel L2 "
                           f"{r['relative_l2']:.2e}" for r in d["latents"]["rows"]))
  return ", ".join(parts)
with open(md, "a") as f:
  f.write(f"| {name} | {status} | {dt} s | {fmt(last)} |\n")
EOF
}

{
  echo "# gpu_suite.sh $(date -u '+%Y-%m-%d %H:%M UTC') (dry run: $DRY)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  git log --oneline -1 2>/dev/null
  echo '```'
  echo
  echo "| stage | status | wall | numbers |"
  echo "| --- | --- | ---: | --- |"
} > "$MD"

stage env 60 $PY -c "
import importlib.util, json, jax
mods = ['grain', 'array_record', 'tree', 'portpicker', 'ml_collections', 'clu', 'tensorboardX',
        'wrapt', 'psutil', 'yaml', 'attrs', 'flax', 'optax', 'orbax.checkpoint', 'torch']
missing = [m for m in mods if importlib.util.find_spec(m.split('.')[0]) is None]
print(json.dumps({'jax': jax.__version__, 'backend': jax.default_backend(),
                  'device_kind': jax.devices()[0].device_kind, 'missing': missing}))"

# 1. The headline: XL/2-3T train step at b256, bf16, attention auto (cuDNN on NVIDIA).
stage train_b256_auto 150 $PY scripts/bench_train.py --config=configs/xl3t.py --batch=$B256 \
  --steps=$STEPS --warmup=$WARM --profile_dir="$WORK/profile" "${XL[@]}"
f=$(find "$WORK/profile" -name '*.trace.json.gz' 2>/dev/null | head -1)
[ -n "$f" ] && cp "$f" "$OUT/profile.trace.json.gz"

# 2. main on a generated REPA folder: 60 steps, SIGKILL at 40, restart from 30.
stage main_60_steps_restart 200 $PY scripts/bench_startup.py --config=configs/xl3t.py \
  --make_fake=$FAKE --num_steps=$MAIN_STEPS --kill_at=$KILL --ckpt_every=$CKPT --override train.global_batch_size=$B256 "${XL[@]:1}"

# 3. Sampling: bf16 and float32 (first result = init + compile + one batch).
for dt in bfloat16 float32; do
  stage sample_$dt 100 $PY scripts/bench_sampling.py --per_device_batch=$SAMPLE_BATCH \
    --samplers=$SAMPLE_STEPS --dtype=$dt --iters=1 "${SAMP[@]}"
done

# 4. The reference PyTorch code on the same card (exactly as released).
REF_BENCH=${REF_BENCH:-$ROOT/../shared/tools/torch_ref_bench.py}
if [ -n "${UPSTREAM_DIR:-}" ] && [ -f "$REF_BENCH" ]; then
  export UPSTREAM_DIR
  stage ref_train_b256 90 $PY "$REF_BENCH" --mode=train --batch=$B256 --steps=$STEPS "${REF_SIZE[@]}"
  stage ref_train_b32 60 $PY "$REF_BENCH" --mode=train --batch=$B32 --steps=$STEPS "${REF_SIZE[@]}"
  stage ref_sample_b64 60 $PY "$REF_BENCH" --mode=sample --batch=$SAMPLE_BATCH --steps=10 "${REF_SIZE[@]}"
else
  echo "| reference | skipped: set UPSTREAM_DIR (and REF_BENCH) | | |" >> "$MD"
fi

# 5. Attention kernels and batch sizes.
stage train_b256_xla 150 $PY scripts/bench_train.py --config=configs/xl3t.py --batch=$B256 \
  --steps=$STEPS --warmup=$WARM --override model.attention_impl=xla "${XL[@]:1}"
stage train_b32_auto 120 $PY scripts/bench_train.py --config=configs/xl3t.py --batch=$B32 \
  --steps=$STEPS --warmup=$WARM "${XL[@]}"
stage train_b32_xla 120 $PY scripts/bench_train.py --config=configs/xl3t.py --batch=$B32 \
  --steps=$STEPS --warmup=$WARM --override model.attention_impl=xla "${XL[@]:1}"

# 6. Remat policies (throughput cost, memory).
for r in block dots; do
  stage train_b256_remat_$r 150 $PY scripts/bench_train.py --config=configs/xl3t.py \
    --batch=$B256 --steps=$STEPS --warmup=$WARM --remat=$r "${XL[@]}"
done

# 7. The fresh-state program with XLA defaults and with Trainer's -O0 (init cost).
stage init_options 120 $PY scripts/bench_startup.py --config=configs/xl3t.py --init_only \
  --override train.global_batch_size=$B32 "${XL[@]:1}"

# 8. Largest per-device batch on an 80 GB card, 256 and 512 pixels.
stage max_batch_256 150 $PY scripts/bench_train.py --config=configs/xl3t.py --find_max_batch \
  --memory_gb=$MEM_GB --memory_headroom=$HEADROOM --probe_batches $PROBE --verify "${XL[@]}"
stage max_batch_512 200 $PY scripts/bench_train.py --config=configs/xl3t.py:512 --find_max_batch \
  --memory_gb=$MEM_GB --memory_headroom=$HEADROOM --probe_batches $PROBE "${XL512[@]}"
stage max_batch_512_remat_block 200 $PY scripts/bench_train.py --config=configs/xl3t.py:512 \
  --find_max_batch --remat=block --memory_gb=$MEM_GB --memory_headroom=$HEADROOM --probe_batches $PROBE "${XL512[@]}"

# 9. bf16 vs float32 sampling of one model, same noise.
stage precision 150 $PY scripts/bench_precision.py "${PREC[@]}"

# 10. The 512 train step at the reference's per-GPU batch.
stage train_512_b32 150 $PY scripts/bench_train.py --config=configs/xl3t.py:512 --batch=$B32 \
  --steps=$STEPS --warmup=$WARM "${XL512[@]}"

echo >> "$MD"
echo "Total $(( $(date +%s) - START )) s." >> "$MD"
cat "$MD"
