#!/usr/bin/env bash
# A long run of the simulation: seeds in chunks until HOURS have passed or a
# seed fails; reports seeds per second and the first failing seed (with the
# command that replays it).
#
#   scripts/sim-soak.sh HOURS [FIRST_SEED] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
hours=${1:?usage: scripts/sim-soak.sh HOURS [FIRST_SEED] [STEPS]}
seed=${2:-$(( $(date +%s) * 1000 ))}
steps=${3:-2000}
chunk=200
cargo build --release -q -p cellpay
bin=target/release/cellpay
end=$(( $(date +%s) + $(awk -v h="$hours" 'BEGIN { print int(h * 3600) }') ))
start=$(date +%s)
ran=0
while [ "$(date +%s)" -lt "$end" ]; do
  if ! out=$("$bin" sim --seed "$seed" --seeds "$chunk" --steps "$steps"); then
    echo "$out" | grep '^FAIL' || echo "$out"
    echo "first failing seed is in $seed..$(( seed + chunk - 1 )) (the line above names it)"
    exit 1
  fi
  ran=$(( ran + chunk ))
  seed=$(( seed + chunk ))
  elapsed=$(( $(date +%s) - start ))
  echo "$ran seeds, $(( ran / (elapsed > 0 ? elapsed : 1) )) seeds/s, next seed $seed"
done
echo "soak passed: $ran seeds of $steps ticks in $(( $(date +%s) - start )) s"
