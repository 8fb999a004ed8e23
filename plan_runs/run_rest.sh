#!/bin/bash
# The XL/2-3T rows of docs/tpu.md, one compile at a time (nice), each run's output in its own log
# (run_all.sh's first run, already going, is waited for: pid in $1).
cd "$(dirname "$0")/.."
while [ -n "$1" ] && kill -0 "$1" 2>/dev/null; do sleep 10; done
if [ -n "$1" ]; then
  echo "$(date -u +%FT%TZ) end xl_v5e-8_256" >> plan_runs/progress.log
  tail -1 plan_runs/xl_v5e-8_256.log >> plan_runs/results.jsonl
fi
run() {
  name=$1; shift
  echo "$(date -u +%FT%TZ) start $name: $*" >> plan_runs/progress.log
  nice -n 10 .venv/bin/python -m deepflow_jax.plan --json "$@" > plan_runs/$name.log 2>&1
  echo "$(date -u +%FT%TZ) end $name rc=$?" >> plan_runs/progress.log
  tail -1 plan_runs/$name.log >> plan_runs/results.jsonl
}
X=--config=configs/xl3t.py
run xl_v5e-8_max $X --topology=v5e:2x4 --find_max_batch --sample_batch=0
run xl_v5e-32_256 $X --topology=v5e:4x8 --sample_batch=0
run xl_v6e-8_256 $X --topology=v6e:2x4 --sample_batch=0
run xl_v5e-1_max $X --topology=v5e:1x1 --find_max_batch --sample_batch=0
run xl_v4-8_256 $X --topology=v4:2x2x1 --sample_batch=0
run xl_v5p-8_256 $X --topology=v5p:2x2x1 --sample_batch=0
run xlssl_v5e-8_256 --config=configs/xl3t.py:ssl --topology=v5e:2x4 --sample_batch=0
run xl512_v5e-8_256 --config=configs/xl3t.py:512 --topology=v5e:2x4 --sample_batch=0
