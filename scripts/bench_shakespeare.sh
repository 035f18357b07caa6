#!/usr/bin/env bash
# The README's first run, whole, in taper and in plain PyTorch (scripts/shakespeare_torch.py: the
# same model, data split, optimizer, schedule, clipping and evaluation cadence), in turn, several
# rounds; prints each run's wall time (process start to exit, data preparation and evaluations
# included) and final val loss, and the median ratio of wall times. The machine is shared and
# noisy: only the paired ratio means much.
#
#   scripts/bench_shakespeare.sh [CONFIG]       (default: configs/shakespeare-char.toml, as shipped)
#   ROUNDS=3 THREADS=2 PYTHON=~/.venvs/ref/bin/python TAPER=target/release/taper scripts/bench_shakespeare.sh
#   BEFORE=/path/to/older/taper scripts/bench_shakespeare.sh     (adds a third contender each round)
#   SET="train.max_steps=300" ...                               (--set overrides for both, space-separated)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-1}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-$HOME/.venvs/ref/bin/python}
TAPER=${TAPER:-target/release/taper}
BEFORE=${BEFORE:-}
CONFIG=${1:-configs/shakespeare-char.toml}
[ -x "$TAPER" ] || cargo build --release -p taper-cli
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sets=()
for kv in ${SET:-}; do sets+=(--set "$kv"); done

run_taper() { # name binary
  local dir="$work/$1" t0 t1
  rm -rf "$dir"
  t0=$(date +%s.%N)
  "$2" pretrain --config "$CONFIG" --run-dir "$dir" --set 'device="cpu"' "${sets[@]}" > "$work/$1.log" 2>&1 \
    || { cat "$work/$1.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$1" "$t0" "$t1" "$dir/metrics.jsonl" <<'PY'
import json, sys
name, t0, t1, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
val = [json.loads(l)["val_loss"] for l in open(path) if '"val_loss"' in l][-1]
print(json.dumps({"impl": name, "wall_s": round(t1 - t0, 2), "val_loss": round(val, 4)}))
PY
}

run_torch() {
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$("$PYTHON" scripts/shakespeare_torch.py --config "$CONFIG" --threads "$THREADS" "${sets[@]}" 2> "$work/torch.err" | tail -1) \
    || { cat "$work/torch.err" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(json.dumps({"impl":"pytorch","wall_s":round(float(sys.argv[3])-float(sys.argv[2]),2),"val_loss":r["val_loss"]}))' "$out" "$t0" "$t1"
}

echo "== $CONFIG ($THREADS threads, $ROUNDS rounds${SET:+, --set $SET})"
rows="$work/rows"
for r in $(seq "$ROUNDS"); do
  run_taper taper "$TAPER" | tee -a "$rows"
  run_torch | tee -a "$rows"
  [ -z "$BEFORE" ] || run_taper before "$BEFORE" | tee -a "$rows"
done
python3 - "$rows" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["impl"], []).append(r)
torch = by["pytorch"]
for name, rs in by.items():
    walls = [r["wall_s"] for r in rs]
    losses = ", ".join("%.4f" % r["val_loss"] for r in rs)
    line = f"{name:<8} wall s {', '.join('%.1f' % w for w in walls)}  val loss {losses}"
    if name != "pytorch":
        ratios = [t["wall_s"] / r["wall_s"] for r, t in zip(rs, torch)]
        line += f"  speed-up over pytorch (median) {statistics.median(ratios):.2f}x"
    print(line)
PY
