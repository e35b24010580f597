#!/usr/bin/env bash
# Runs the AFL++ fuzz targets: scripts/fuzz.sh TARGET|all SECONDS
#
# Installs cargo-afl (which builds AFL++ from C) when missing, builds the
# targets in fuzz/ with `cargo afl build --release` on the pinned stable
# toolchain, and runs each target for SECONDS on its corpus (fuzz/corpus/TARGET),
# one at a time. Findings land in fuzz/out/TARGET (not committed); crashes are
# copied to fuzz/regressions/TARGET/, which the replay test
# (crates/fuzzing/tests/replay.rs) runs in `cargo test --workspace`.
# Afterwards it prints execs/s, coverage and crashes per target.
#
# FUZZ_CMIN=1 also minimises each target's corpus with afl-cmin into
# fuzz/corpus/TARGET (review the diff before committing it).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

targets=(log_segment batch snapshot tier_run idempotency_record http_bodies wire)
target=${1:?usage: scripts/fuzz.sh TARGET|all SECONDS (targets: ${targets[*]})}
seconds=${2:?usage: scripts/fuzz.sh TARGET|all SECONDS}
if [[ $target == all ]]; then
  run=("${targets[@]}")
elif [[ " ${targets[*]} " == *" $target "* ]]; then
  run=("$target")
else
  echo "unknown target $target; targets: ${targets[*]}" >&2
  exit 2
fi

if ! cargo afl --version >/dev/null 2>&1; then
  cargo install --locked cargo-afl
fi
cargo afl build --release

# A machine without a tuned kernel: AFL++ would refuse to start otherwise.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1

mkdir -p out
new=0
for t in "${run[@]}"; do
  echo "== $t: ${seconds}s"
  # -V stops after SECONDS; a resumed run continues the queue in out/$t.
  input=corpus/$t
  [[ -d out/$t/default/queue ]] && input=-
  cargo afl fuzz -i "$input" -o "out/$t" -V "$seconds" "target/release/$t" >"out/$t.log" 2>&1 || {
    echo "afl-fuzz failed; see fuzz/out/$t.log" >&2
    tail -20 "out/$t.log" >&2
    exit 1
  }
  crashes=(out/"$t"/default/crashes/id:*)
  if [[ -e ${crashes[0]} ]]; then
    mkdir -p "regressions/$t"
    for c in "${crashes[@]}"; do
      # Named by content, so a resumed run does not copy a crash twice.
      dest="regressions/$t/crash-$(sha1sum <"$c" | cut -c1-16)"
      [[ -e $dest ]] || { cp "$c" "$dest"; new=$((new + 1)); }
    done
  fi
  if [[ ${FUZZ_CMIN:-0} == 1 ]]; then
    rm -rf "out/$t.cmin"
    cargo afl cmin -i "out/$t/default/queue" -o "out/$t.cmin" -- "target/release/$t" >/dev/null
    rm -f "corpus/$t"/*
    cp "out/$t.cmin"/* "corpus/$t/"
  fi
done

echo
printf '%-20s %12s %12s %10s %8s\n' target execs/s execs coverage crashes
for t in "${run[@]}"; do
  s=out/$t/default/fuzzer_stats
  v() { sed -n "s/^$1 *: *//p" "$s"; }
  printf '%-20s %12s %12s %10s %8s\n' "$t" "$(v execs_per_sec)" "$(v execs_done)" "$(v bitmap_cvg)" "$(v saved_crashes)"
done
if ((new > 0)); then
  echo "$new new crash(es) copied to fuzz/regressions/: replay with 'cargo test -p cellpay-fuzzing --test replay'"
  exit 1
fi
