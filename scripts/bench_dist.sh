#!/usr/bin/env bash
# Data-parallel scaling on this machine: `taper bench` as 1 process and as 2 MPI replicas,
# one thread each, with the optimizer replicated and sharded; tokens/s (all replicas), the
# speed-up over one process, the gradient all-reduce's time and share of a step, and each
# replica's optimizer state and peak RSS. Needs a taper built with `--features mpi`.
#
#   scripts/bench_dist.sh [CONFIG]          (default: configs/bench/reference.toml)
#   ROUNDS=3 STEPS=10 TAPER=target/release/taper scripts/bench_dist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/bench/reference.toml}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-10}
TAPER=${TAPER:-target/release/taper}
[ -x "$TAPER" ] || cargo build --release -p taper-cli --features mpi
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 OMP_NUM_THREADS=1
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to core)
out=$(mktemp)
for r in $(seq "$ROUNDS"); do
  "$TAPER" bench --config "$CONFIG" --steps "$STEPS" --json | sed "s/^/1 replicated $r /" >> "$out"
  "${MPIRUN[@]}" -np 2 "$TAPER" bench --config "$CONFIG" --steps "$STEPS" --json | sed "s/^/2 replicated $r /" >> "$out"
  "${MPIRUN[@]}" -np 2 "$TAPER" bench --config "$CONFIG" --steps "$STEPS" --json --set train.shard_optimizer=true \
    | sed "s/^/2 sharded $r /" >> "$out"
done
python3 - "$out" "$CONFIG" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, mode, rnd, js = line.split(" ", 3)
    rows.setdefault((int(n), mode), []).append(json.loads(js))
med = lambda key, k: statistics.median(r[k] for r in rows[key])
base = med((1, "replicated"), "tokens_per_sec")
print(f"== {sys.argv[2]}, 1 thread a process, {len(rows[(1, 'replicated')])} rounds (medians)")
fmt = "{:>9} {:>11} {:>9} {:>8} {:>13} {:>10} {:>13} {:>12}"
print(fmt.format("processes", "optimizer", "tokens/s", "speed-up", "all-reduce ms", "share", "opt state MB", "peak RSS MB"))
for key in [(1, "replicated"), (2, "replicated"), (2, "sharded")]:
    t = med(key, "tokens_per_sec")
    print(fmt.format(key[0], key[1], f"{t:.0f}", f"{t / base:.2f}x", f"{med(key, 'allreduce_ms'):.1f}",
                     f"{100 * med(key, 'allreduce_share'):.1f}%", f"{med(key, 'optimizer_state_mb'):.1f}",
                     f"{med(key, 'peak_rss_mb'):.0f}"))
PY
rm -f "$out"
