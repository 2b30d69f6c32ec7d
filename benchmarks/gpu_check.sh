#!/usr/bin/env bash
# Every check and benchmark row that needs a CUDA device, in one command (about 10 minutes on one H200):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [SECTION ...]     # default OUT_DIR benchmarks/results/gpu
#
# Sections (default: all, in this order): env tests train tokenizer attention ddp compile.
#   tests      tests/test_cuda.py and the other CUDA-only tests (fast paths vs reference paths on CUDA)
#   train      the paper preset's training step, bf16 autocast + fused AdamW, sdpa and flex, MFU
#   tokenizer  encode + decode at bf16, sdpa and flex, against AutoencoderKL when diffusers is installed
#   attention  the decoder's attention variants at the paper's shape, forward and forward + backward
#   ddp        `hieratok train` under torchrun (DDP, then FSDP2) for a few steps on the embedded photos
#   compile    the training step with the model under torch.compile
# Each section has a time limit and appends its output to OUT_DIR/gpu_check.log as it runs (its JSON
# beside it); a failed section does not stop the next. The summary at the end lists each section's
# exit code and seconds. The ddp runs go to a temporary folder, removed at the end.
set -u
out=${1:-benchmarks/results/gpu}
shift || true
sections=${*:-env tests train tokenizer attention ddp compile}
mkdir -p "$out"
log=$out/gpu_check.log
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
export PYTHONUNBUFFERED=1
summary=()

run() {  # run NAME SECONDS COMMAND...: one section, its output appended to the log
  local name=$1 limit=$2 start rc
  shift 2
  case " $sections " in *" $name "*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 30
  rc=${PIPESTATUS[0]}
  summary+=("$name rc=$rc $(($(date +%s) - start))s")
  echo "== $name rc=$rc" >>"$log"
}

run env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
run tests 300 python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/generators/test_generator_devices.py tests/losses/test_dino_disc.py -k "cuda or test_cuda"
run train 120 python benchmarks/bench_train_step.py --gpu-only --gpu-batch 32 --json "$out/train.json"
run tokenizer 120 python benchmarks/bench_tokenizer.py --gpu-only --gpu-batch 64 --rounds 5 \
  --models hieratok-f16d16 hieratok-f16d16-single sd-vae --json "$out/tokenizer.json"
run attention 90 python benchmarks/bench_attention.py --gpu-only --batch 32 --rounds 10 --json "$out/attention.json"
run ddp 120 bash -c "\
  torchrun --standalone --nproc_per_node 1 -m hieratok train --preset tiny --steps 30 --out '$runs/ddp' \
    progress=false tensorboard=false image_every=0 log_every=10 && \
  torchrun --standalone --nproc_per_node 1 -m hieratok train --fsdp --preset tiny --steps 30 --out '$runs/fsdp' \
    progress=false tensorboard=false image_every=0 log_every=10 && \
  ls '$runs/ddp/checkpoints' '$runs/fsdp/checkpoints'"
run compile 200 python benchmarks/bench_train_step.py --gpu-only --gpu-batch 32 --compile --json "$out/train_compile.json"
echo "== summary"
printf '%s\n' "${summary[@]}" | tee -a "$log"
