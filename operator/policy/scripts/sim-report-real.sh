#!/usr/bin/env bash
# The kestrel-sim runs of docs/autoscaling.md "Results on the measured profile", in
# order, with their plots. Usage: operator/policy/scripts/sim-report-real.sh (repo root)
set -euo pipefail
cargo build --release -q -p kestrel-policy --bin kestrel-sim
SIM=target/release/kestrel-sim
T=${TRACES:-/work/shared/data/traces}
P=worker/profiles/cpu-2core-xeon.json
IMG=docs/img
mkdir -p "$IMG"
run() { echo; echo "\$ kestrel-sim $*"; "$SIM" "$@"; }

echo "## R1. Every policy, f32, rate x150 (seed 42)"
for f in code conv; do
  run --trace "$T/azure-llm-2023-$f.csv" --rate-scale 150 --variants f32 --profile $P \
    --plot "$IMG/autoscaling-real-$f.png"
done
echo "## R2. Rate scale x50 and x300"
for rs in 50 300; do for f in code conv; do
  run --trace "$T/azure-llm-2023-$f.csv" --rate-scale $rs --variants f32 --profile $P
done; done
echo "## R3. Headroom sigmas 0 / 2.33 (default) / 4, Kestrel only"
for z in 0 2.33 4; do for rs in 50 150 300; do for f in code conv; do
  echo "$f x$rs z=$z: $("$SIM" --trace "$T/azure-llm-2023-$f.csv" --rate-scale $rs --variants f32 --profile $P --policies kestrel --headroom-sigmas $z --json)"
done; done; done
echo "## R4. Priced variants: f32 1.00/h, int8 0.60/h"
for f in code conv; do for v in f32,int8 f32 int8; do
  run --trace "$T/azure-llm-2023-$f.csv" --rate-scale 150 --variants $v --profile $P \
    --price f32=1.0,int8=0.6 --policies kestrel,static-peak,hpa,ray-serve
done; done
echo "## R5. Seeds 1-5, x150"
for f in code conv; do for s in 1 2 3 4 5; do
  echo "$f seed $s: $("$SIM" --trace "$T/azure-llm-2023-$f.csv" --rate-scale 150 --variants f32 --profile $P --seed $s --json)"
done; done
echo "## R6. Synthetic shapes (seed 42), 300 -> 3000/s"
for s in diurnal step spike; do
  run --synthetic $s --seed 42 --synthetic-base 300 --synthetic-peak 3000 --variants f32 --profile $P
done
