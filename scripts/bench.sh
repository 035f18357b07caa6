#!/usr/bin/env bash
# taper against PyTorch on the same model, in turn, several rounds; prints each round and the
# median tokens/s ratio (taper / PyTorch) and peak RSS of each. The machine is shared and noisy:
# only the paired ratio means much.
#
#   scripts/bench.sh [CONFIG...]            (default: configs/bench/reference.toml configs/bench/small.toml)
#   ROUNDS=5 THREADS=2 STEPS=10 PYTHON=~/.venvs/ref/bin/python TAPER=target/release/taper scripts/bench.sh
#   BEFORE=/path/to/older/taper scripts/bench.sh     (a third contender each round, for before/after)
#   PRECISION=bf16 scripts/bench.sh     (taper's train.precision = "bf16" against PyTorch's bf16 autocast;
#                                        MFU against both the f32 and the bf16 GEMM peaks)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
PYTHON=${PYTHON:-$HOME/.venvs/ref/bin/python}
TAPER=${TAPER:-target/release/taper}
BEFORE=${BEFORE:-}
PRECISION=${PRECISION:-f32}
[ -x "$TAPER" ] || cargo build --release -p taper-cli
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/bench/reference.toml configs/bench/small.toml)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
for cfg in "${configs[@]}"; do
  echo "== $cfg ($THREADS threads, $STEPS steps, $ROUNDS rounds, $PRECISION)"
  out=$(mktemp)
  for r in $(seq "$ROUNDS"); do
    "$TAPER" bench --config "$cfg" --steps "$STEPS" --set "train.precision=\"$PRECISION\"" --json | sed "s/^/taper $r /" >> "$out"
    "$PYTHON" scripts/bench_torch.py --config "$cfg" --threads "$THREADS" --steps "$STEPS" --precision "$PRECISION" --json | sed "s/^/torch $r /" >> "$out"
    [ -z "$BEFORE" ] || "$BEFORE" bench --config "$cfg" --steps "$STEPS" --json | sed "s/^/before $r /" >> "$out"
  done
  "$PYTHON" - "$out" <<'PY'
import json, statistics, sys
rows = {"taper": [], "torch": [], "before": []}
for line in open(sys.argv[1]):
    who, rnd, js = line.split(" ", 2)
    rows[who].append(json.loads(js))
fmt = "{:<6} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8}"
print(fmt.format("", "round", "tokens/s", "fwd ms", "bwd ms", "opt ms", "GFLOP/s", "peak", "MFU", "RSS MB"))
for who in [w for w in rows if rows[w]]:
    for i, r in enumerate(rows[who], 1):
        print(fmt.format(who, i, f"{r['tokens_per_sec']:.0f}", f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}",
                         f"{r['optimizer_ms']:.1f}", f"{r['gflops']:.1f}", f"{r['gemm_peak_gflops']:.0f}",
                         f"{100 * r['mfu']:.1f}%", f"{r['peak_rss_mb']:.0f}"))
ratios = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(rows["taper"], rows["torch"])]
med = lambda who, k: statistics.median(r[k] for r in rows[who])
print(f"median tokens/s ratio taper/pytorch: {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
if rows["before"]:
    ratios = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(rows["before"], rows["torch"])]
    print(f"median tokens/s ratio before/pytorch: {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
if rows["taper"][0].get("precision", "f32") != "f32":
    print(f"median MFU against the {rows['taper'][0]['precision']} GEMM peaks: taper {100 * med('taper', 'precision_mfu'):.1f}% "
          f"(peak {med('taper', 'precision_gemm_peak_gflops'):.0f}), pytorch {100 * med('torch', 'precision_mfu'):.1f}% "
          f"(peak {med('torch', 'precision_gemm_peak_gflops'):.0f})")
print(f"median MFU: taper {100 * med('taper', 'mfu'):.1f}%, pytorch {100 * med('torch', 'mfu'):.1f}%; "
      f"peak RSS MB: taper {med('taper', 'peak_rss_mb'):.0f}, pytorch {med('torch', 'peak_rss_mb'):.0f}")
print(f"median activations and scratch MB (peak beyond weights, gradients, optimizer state): "
      f"taper {med('taper', 'activations_mb'):.0f}, pytorch {med('torch', 'activations_mb'):.0f}")
PY
  rm -f "$out"
done
