#!/usr/bin/env bash
# Every kestrel-sim run quoted in docs/autoscaling.md, in order, with its plots.
# Usage: operator/policy/scripts/sim-report.sh  (from the repository root)
# The profile is the worker's measured one (worker/profiles/cpu-2core-xeon.json, the
# simulator's default): an f32 replica serves ~400 inputs/s, int8 ~750/s. The traces
# are scaled ×200 (RATE_SCALE) so that fleets span 1 to ~17 replicas.
set -euo pipefail
cargo build --release -q -p kestrel-policy --bin kestrel-sim
SIM=target/release/kestrel-sim
T=${TRACES:-/work/shared/data/traces}
RS=${RATE_SCALE:-200}
CODE=$T/azure-llm-2023-code.csv
CONV=$T/azure-llm-2023-conv.csv
IMG=docs/img
mkdir -p "$IMG"
run() { echo; echo "\$ kestrel-sim $*"; "$SIM" "$@"; }

echo "## 1. One variant (f32), every policy, both traces (default jitter ±5 s)"
run --trace "$CODE" --rate-scale "$RS" --variants f32 --plot "$IMG/autoscaling-code.png"
run --trace "$CONV" --rate-scale "$RS" --variants f32 --plot "$IMG/autoscaling-conv.png"

echo "## 2. The anchors' best shot: per-replica concurrency target 2, 4, 16"
for q in 2 4 16; do
  run --trace "$CODE" --rate-scale "$RS" --variants f32 --target-queue $q
  run --trace "$CONV" --rate-scale "$RS" --variants f32 --target-queue $q
done

echo "## 3. Other rate scales (×100, ×400) and seeds 1-3: is the result tuned to one?"
for f in "$CODE" "$CONV"; do
  for r in 100 400; do
    for s in 1 2 3; do
      echo "$(basename "$f") x$r seed $s: $("$SIM" --trace "$f" --rate-scale $r --variants f32 --seed $s --policies kestrel,hpa,static-peak --json)"
    done
  done
done

echo "## 4. Harsher scaling: copies within ±0.5 s; faster cold start (5 s)"
run --trace "$CODE" --rate-scale "$RS" --variants f32 --jitter-s 0.5
run --trace "$CONV" --rate-scale "$RS" --variants f32 --jitter-s 0.5
run --trace "$CODE" --rate-scale "$RS" --variants f32 --cold-start-s 5
run --trace "$CONV" --rate-scale "$RS" --variants f32 --cold-start-s 5

echo "## 5. Priced variants: f32 1.00/h, int8 0.60/h; the anchors on f32, then on int8"
for f in "$CODE" "$CONV"; do
  run --trace "$f" --rate-scale "$RS" --variants f32,int8 --price f32=1.0,int8=0.6
  run --trace "$f" --rate-scale "$RS" --variants f32,int8 --price f32=1.0,int8=0.6 --anchor-variant int8
done

echo "## 6. Synthetic shapes (seed 42, 300→3000/s): diurnal, step, spike"
for s in diurnal step spike; do
  run --synthetic $s --seed 42 --synthetic-base 300 --synthetic-peak 3000 --variants f32 \
    $( [ $s = diurnal ] && echo --plot "$IMG/autoscaling-diurnal.png" )
  run --synthetic $s --seed 42 --synthetic-base 300 --synthetic-peak 3000 --variants f32,int8 \
    --price f32=1.0,int8=0.6 --anchor-variant int8 --policies kestrel,static-peak
done

echo "## 7. Determinism: the same seed twice gives byte-identical JSON"
a=$("$SIM" --trace "$CONV" --rate-scale "$RS" --variants f32 --json --seed 7)
b=$("$SIM" --trace "$CONV" --rate-scale "$RS" --variants f32 --json --seed 7)
[ "$a" = "$b" ] && echo "identical: $a"

echo "## 8. Seeds 1-5 (routing, jitter and rate-scaling draws), JSON per run"
for f in "$CODE" "$CONV"; do
  for s in 1 2 3 4 5; do
    echo "$(basename "$f") seed $s: $("$SIM" --trace "$f" --rate-scale "$RS" --variants f32 --seed $s --json)"
  done
done

echo "## 9. Nodes fit 5 replicas: the rest stay Pending as Unschedulable"
run --trace "$CONV" --rate-scale "$RS" --variants f32 --max-scheduled 5
echo "(kestrel's decisions blocked by Pending pods:)"
"$SIM" --trace "$CONV" --rate-scale "$RS" --variants f32 --max-scheduled 5 --policies kestrel --explain 2>&1 >/dev/null \
  | grep -E "Pending|decisions by reason" | tail -4

echo "## 10. Kestrel's scale-down delay (spec.scaling.scaleDownDelaySeconds): 60, 120, 600 s"
for d in 60 120 600; do
  run --trace "$CODE" --rate-scale "$RS" --variants f32 --scale-down-delay-s $d --policies kestrel
  run --trace "$CONV" --rate-scale "$RS" --variants f32 --scale-down-delay-s $d --policies kestrel
done
