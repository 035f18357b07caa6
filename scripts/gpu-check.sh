#!/usr/bin/env bash
# The GPU check (issue 20): on a machine with an NVIDIA GPU, its driver and the CUDA toolkit,
# one command that builds taper with CUDA, runs every CUDA kernel test against the composed
# ops, the HF parity tests and a resume-equals-uninterrupted run on the GPU, then benchmarks
# GPT-2 124M in bf16 with `taper bench` and PyTorch (eager and torch.compile) side by side.
# One line per check (PASS, FAIL or SKIP, and the figures); exits 1 if any check failed, 2 if
# there was no GPU to check on (the CPU-side steps still run: the CUDA build's `cargo check`,
# the kernel tests compiled, the CPU run of the same resume test).
#
#   scripts/gpu-check.sh                      # builds with cargo
#   TAPER_BIN=/path/to/taper scripts/gpu-check.sh
#
# Without a Rust toolchain on the GPU machine: build on another Linux x86-64 machine with the
# same CUDA major version (the toolkit's lib64/stubs on LIBRARY_PATH provides libcuda.so to
# link against; the real driver is loaded at run time):
#   CUDA_COMPUTE_CAP=90 cargo build --release -p taper-cli --features cuda
#   CUDA_COMPUTE_CAP=90 cargo test --release --features taper-kernels/cuda -p taper-kernels --no-run
# then copy target/release/taper and target/release/deps/{cuda,cuda_attention,cuda_optim}-* over and set
# TAPER_BIN (the binary) and TAPER_TEST_BINS (a folder holding the three test executables).
# Environment: PYTHON (default python3; needs torch with CUDA) for the PyTorch side; BATCHES
# (default "32 24 16 12 8 4") the batch sizes tried for the benchmark, largest that fits first;
# PEAK_TFLOPS to override the GPU's dense bf16 peak when its name is not in the table below.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-"32 24 16 12 8 4"}
logs=$(mktemp -d /tmp/gpu-check.XXXXXX)
target=${CARGO_TARGET_DIR:-target}
failed=0
have_gpu=0

say() { printf '%-5s %-34s %s\n' "$1" "$2" "$3"; }

# run NAME CMD...: one check, its output in $logs/NAME.log.
run() {
  local name=$1
  shift
  if "$@" >"$logs/$name.log" 2>&1; then
    say PASS "$name" "(log $logs/$name.log)"
  else
    say FAIL "$name" "(exit $?, log $logs/$name.log; its last lines:)"
    tail -n 15 "$logs/$name.log" | sed 's/^/      | /'
    failed=1
  fi
}

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  have_gpu=1
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
  say INFO gpu "$gpu, driver $driver, CUDA $cuda, compute capability $cap"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}
else
  say SKIP gpu "no NVIDIA GPU (nvidia-smi finds none): the GPU checks below are skipped"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fi

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets.
peak_tflops() {
  case "$1" in
    *H200*) echo 989 ;;
    *H100*PCIe*) echo 756 ;;
    *H100*) echo 989 ;;
    *A100*) echo 312 ;;
    *L40S*) echo 362 ;;
    *L4*) echo 121 ;;
    *A10G*) echo 70 ;;
    *) echo "${PEAK_TFLOPS:-}" ;;
  esac
}

# 1. The build.
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-}
[ -n "$CUDARC_CUDA_VERSION" ] || unset CUDARC_CUDA_VERSION
kernel_tests=(--test cuda --test cuda_attention --test cuda_optim)
if [ -n "${TAPER_BIN:-}" ]; then
  say INFO build "prebuilt binary $TAPER_BIN"
  taper=$TAPER_BIN
elif [ "$have_gpu" = 1 ]; then
  run build cargo build --release -p taper-cli --features cuda
  run build-kernel-tests cargo test --release -p taper-kernels --features cuda "${kernel_tests[@]}" --no-run
  taper=$target/release/taper
else
  # Linking needs libcuda, which only a machine with the driver has: check what compiles.
  run build-check cargo check -p taper-cli --features cuda
  run build-check-tests cargo check -p taper-kernels --features cuda --tests
  taper=
fi

# 2. Every CUDA kernel against the composed ops on the GPU.
if [ "$have_gpu" = 1 ]; then
  if [ -n "${TAPER_TEST_BINS:-}" ]; then
    for t in cuda cuda_attention cuda_optim; do
      bin=$(ls "$TAPER_TEST_BINS"/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1)
      run "kernels-$t" env TAPER_REQUIRE_CUDA=1 "$bin" --test-threads=1
    done
  else
    run kernels env TAPER_REQUIRE_CUDA=1 cargo test --release -p taper-kernels --features cuda "${kernel_tests[@]}" \
      -- --test-threads=1
  fi
  # 3. Parity with transformers on the GPU (composed path, then the CUDA kernels).
  if command -v cargo >/dev/null; then
    run hf-parity-composed env TAPER_TEST_DEVICE=cuda cargo test --release -p taper-model --features taper-kernels/cuda \
      --test hf_parity -- --test-threads=1
    run hf-parity-kernels env TAPER_TEST_DEVICE=cuda TAPER_CUDA_KERNELS=1 cargo test --release -p taper-model \
      --features taper-kernels/cuda --test hf_parity -- --test-threads=1
  else
    say SKIP hf-parity "no cargo on this machine (the parity tests are cargo tests)"
  fi
else
  say SKIP kernels "no GPU"
  say SKIP hf-parity "no GPU"
fi

# 4. Resume equals uninterrupted, through the binary: 8 steps straight against 4 + 4 resumed,
# the final weights compared byte for byte.
resume_check() { # BINARY DEVICE KERNELS(0 or 1)
  local bin=$1 device=$2 d
  export TAPER_CUDA_KERNELS=$3
  d=$(mktemp -d /tmp/gpu-check-resume.XXXXXX)
  cat >"$d/run.toml" <<EOF
seed = 7
device = "$device"
[model]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
dropout = 0.1
[data]
dataset = "tinyshakespeare"
tokenizer = "char"
[train]
max_steps = 8
batch_size = 4
grad_accum_steps = 2
log_every = 1
eval_every = 4
checkpoint_every = 4
[optim]
lr = 3e-3
EOF
  "$bin" pretrain --config "$d/run.toml" --run-dir "$d/straight" &&
    "$bin" pretrain --config "$d/run.toml" --run-dir "$d/split" --set train.stop_at_step=4 &&
    "$bin" pretrain --config "$d/run.toml" --run-dir "$d/split" --resume &&
    cmp "$d/straight/checkpoints/step_00000008/model.safetensors" "$d/split/checkpoints/step_00000008/model.safetensors" &&
    cmp "$d/straight/checkpoints/step_00000008/optimizer.safetensors" \
      "$d/split/checkpoints/step_00000008/optimizer.safetensors"
}
if [ "$have_gpu" = 1 ]; then
  run resume-cuda resume_check "$taper" cuda 0
  run resume-cuda-kernels resume_check "$taper" cuda 1
  unset TAPER_CUDA_KERNELS
else
  say SKIP resume-cuda "no GPU"
  if command -v cargo >/dev/null; then
    cargo build --release -q -p taper-cli >"$logs/build-cpu.log" 2>&1 &&
      run resume-cpu resume_check "$target/release/taper" cpu 0
  fi
fi

# 5. GPT-2 124M in bf16: taper (composed path and CUDA kernels) and PyTorch (eager, compiled).
if [ "$have_gpu" = 1 ]; then
  peak=$(peak_tflops "$gpu")
  # The GPU's memory in use, sampled every 100 ms while a command runs; its peak in MiB.
  with_memory() {
    local out=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out.mem" &
    local smi=$!
    "$@" >"$out"
    local rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    return $rc
  }
  bench_taper() { # MODE: composed or kernels
    local mode=$1 b
    for b in $BATCHES; do
      if with_memory "$logs/taper-$mode.json" env TAPER_CUDA_KERNELS=$([ "$mode" = kernels ] && echo 1 || echo 0) \
        "$taper" bench --config configs/bench/gpt2-124m.toml --set device=\"cuda\" --set train.precision=\"bf16\" \
        --set train.batch_size=$b --steps 10 --warmup 3 --json 2>"$logs/taper-$mode.err"; then
        echo "$b"
        return 0
      fi
    done
    return 1
  }
  bench_torch() { # MODE: eager or compile
    local mode=$1 b extra=()
    [ "$mode" = compile ] && extra=(--compile)
    for b in $BATCHES; do
      if with_memory "$logs/torch-$mode.json" "$PYTHON" scripts/bench_torch.py --config configs/bench/gpt2-124m.toml \
        --device cuda --precision bf16 --batch-size "$b" --steps 10 --warmup 3 --json "${extra[@]}" \
        2>"$logs/torch-$mode.err"; then
        echo "$b"
        return 0
      fi
    done
    return 1
  }
  summary() { # NAME JSON BATCH
    "$PYTHON" - "$1" "$2" "$3" "$peak" <<'PY'
import json, sys
name, path, batch, peak = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
r = json.loads(open(path).read().strip().splitlines()[-1])
mem = max((int(l) for l in open(path + ".mem") if l.strip().isdigit()), default=0)
mfu = f"{100 * r['gflops'] / (float(peak) * 1e3):.1f}% of {peak} TFLOP/s bf16" if peak else "MFU: set PEAK_TFLOPS"
print(f"{'BENCH':<5} {name:<34} batch {batch}: {r['tokens_per_sec']:.0f} tokens/s, {mfu}, peak GPU memory {mem} MiB")
open(sys.argv[2] + ".tps", "w").write(str(r["tokens_per_sec"]))
PY
  }
  for mode in composed kernels; do
    if b=$(bench_taper $mode); then
      summary "taper ($mode)" "$logs/taper-$mode.json" "$b"
    else
      say FAIL "bench taper ($mode)" "(no batch in $BATCHES ran; $logs/taper-$mode.err)"
      failed=1
    fi
  done
  for mode in eager compile; do
    if b=$(bench_torch $mode); then
      summary "pytorch ($mode)" "$logs/torch-$mode.json" "$b"
    else
      say FAIL "bench pytorch ($mode)" "(no batch ran; $logs/torch-$mode.err)"
      failed=1
    fi
  done
  if [ -f "$logs/taper-kernels.json.tps" ] && [ -f "$logs/torch-eager.json.tps" ]; then
    ratio=$("$PYTHON" -c "print(f'{$(cat "$logs/taper-kernels.json.tps") / $(cat "$logs/torch-eager.json.tps"):.2f}')")
    say INFO "taper kernels / pytorch eager" "$ratio x tokens/s"
  fi
else
  say SKIP bench "no GPU"
fi

if [ "$failed" = 1 ]; then
  say FAIL gpu-check "(logs in $logs)"
  exit 1
elif [ "$have_gpu" = 0 ]; then
  say SKIP gpu-check "the CPU-side steps passed; nothing was verified on a GPU"
  exit 2
fi
say PASS gpu-check "(logs in $logs)"
