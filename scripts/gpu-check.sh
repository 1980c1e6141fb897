#!/usr/bin/env bash
# The GPU path, verified on a machine with one NVIDIA GPU and the project's Python dependencies (PyTorch,
# torchvision, h5py, PyYAML, xxhash; no Horovod, no system MPI needed). Runs from the source tree:
#
#   scripts/gpu-check.sh [OUT_DIR]        (default OUT_DIR: $OUT, else a new temporary folder)
#   CHECKS="2 3" scripts/gpu-check.sh     (only some of the checks; default 1-6 and 8)
#
# Prints one line per check ("gpu-check: <check>: PASS|FAIL|MEASURED|SKIP ...") and keeps every run's
# output, metrics.h5 and the benchmark JSON in OUT_DIR. Exit status 1 when a correctness check fails;
# throughput targets are reported, never failed (they are benchmark figures, not tests).
#   1. a single-process CUDA run of configs/demo.yaml in fp32, bf16 and fp16: accuracy far above chance;
#   2. two ranks on the one GPU through the torch backend (torchrun; Gloo, as NCCL refuses two ranks on
#      one device) and the simulated backend on CUDA: each equal to the same run on the CPU (fp32, TF32 off),
#      SlowMo, and post-local SGD with bf16 gradient buckets (comm.gradient_compression) before its switch;
#   3. ResNet-50, batch 128 per rank, 224x224, bf16, channels-last: the package's training step without
#      communication against a plain PyTorch loop (bench --phases precision; target >= 0.95);
#   4. the simulated backend's 16 ResNet-18 replicas at 32x32 as one batched step against 16 steps of one
#      model in a row (bench --phases simulation);
#   5. what compressed syncs cost in compute on the device: encoding and decoding a ResNet-50-sized update
#      (25,557,032 float32 values) in bf16 and int8 with error feedback, as the engine does it per sync:
#      its time, and the same bits as on the CPU;
#   6. what train.compile buys: check 3's problem with both loops also through torch.compile, paired
#      with the eager ones (bench --phases precision --compile true; the compilation is untimed);
#   8. a language model: configs/lm/demo.yaml in one process in bf16 learns well below its corpus's unigram
#      entropy (its tokens/s and, on the GPU, MFU); then a GPT-2-small-shaped transformer (12 layers, 12 heads, 768 wide, 1024 tokens, vocabulary
#      50304), 8 windows per step, bf16, both loops through torch.compile: the package's step against a plain
#      nanoGPT-style loop (AdamW, clip_grad_norm_, autocast), its tokens/s and its MFU of the GPU's dense bf16 peak
#      (bench --model gpt --phases precision --compile true; target >= 0.95; about a minute on an H100, most of
#      it compiling);
#   7. (only when asked: CHECKS=7; about 5 minutes on 16 cores) the emulated 1 Gb/s network of
#      launcher/slownet.py on the machine's CPUs, 2 ranks of ResNet-50 at 32x32, each with half the cores and
#      one torch thread: H = 4 overlapped by 3 and int8 with error feedback at H = 1 overlapped by 1, each
#      without and with comm.sync_thread in every repetition (bench --compare-sync-thread true), against the
#      bare limit and, paired, against the limit measured in the same repetitions. It needs
#      root, mpirun, and ip and tc: where the machine has none, carry them from one that has
#      (scripts/iproute2-bundle.sh writes .iproute2/, which this script puts first on PATH; IPROUTE2=DIR
#      names another folder).
# Without a GPU it runs the same checks on the CPU where they make sense (1 in fp32 and bf16, 2 with the
# CPU as both sides, 3, 4 and 8 on small problems) and says which it skipped: a test of the script's logic.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-$(mktemp -d -t gpu-check.XXXXXX)}}
mkdir -p "$OUT"
# Check 2 compares the GPU with the CPU to float tolerance: no TF32 in cuDNN or cuBLAS.
export NVIDIA_TF32_OVERRIDE=0
CHECKS=" ${CHECKS:-1 2 3 4 5 6 8} "
failed=0
started=$SECONDS
# Check 2's runs take every setting from --set.
EMPTY_CONFIG="$OUT/empty.yaml"
echo "# every value comes from --set" >"$EMPTY_CONFIG"

say() { printf 'gpu-check: %s\n' "$*" | tee -a "$OUT/gpu-check.txt"; }

GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')") || {
  say "FAIL: $PY cannot import torch"
  exit 1
}
if [[ -n $GPU ]]; then
  DEVICE=cuda
  say "device: $GPU ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
else
  DEVICE=cpu
  say "device: no CUDA device visible: the CPU fallback (the checks' logic, small problems)"
fi

# train NAME [ARGS...]: one training run, its output in $OUT/NAME.log, its run dir $OUT/NAME.
train() {
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  "$@" --run-dir "$OUT/$name" >"$OUT/$name.log" 2>&1
}

final_accuracy() {
  "$PY" -c "import sys; from hpc_localsgd.io.metrics import read_metrics
print(f\"{read_metrics(sys.argv[1])['evals']['test_accuracy'][-1]:.4f}\")" "$OUT/$1/metrics.h5"
}

# same_run A B same-backend|other-backend: the averaged model's test loss and accuracy at every
# evaluation of runs A and B agree (rtol 1e-3), and so does the logged training loss at every step when
# both runs are of one backend (ranks log rank 0's loss, a simulation its workers' mean).
same_run() {
  "$PY" - "$OUT/$1/metrics.h5" "$OUT/$2/metrics.h5" "$3" <<'EOF'
import sys
import numpy as np
from hpc_localsgd.io.metrics import read_metrics
a, b = (read_metrics(path) for path in sys.argv[1:3])
evals = len(a["evals"]["test_loss"])
assert evals == len(b["evals"]["test_loss"]) and evals > 1, "different numbers of evaluations"
compared = ["evals test_loss"] + (["steps loss"] if sys.argv[3] == "same-backend" else [])
worst = 0.0
for group, name in (c.split() for c in compared):
    x, y = a[group][name], b[group][name]
    np.testing.assert_allclose(x, y, rtol=1e-3)
    worst = max(worst, float(np.max(np.abs(x - y) / np.abs(y))))
np.testing.assert_allclose(a["evals"]["test_accuracy"], b["evals"]["test_accuracy"], atol=2 / 256)
print(f"{evals} evaluations, largest relative difference ({', '.join(compared)}) {worst:.1e}")
EOF
}

# --- 1. the demo in every precision ------------------------------------------------------------------
precisions="fp32 bf16 fp16"
[[ $DEVICE == cpu ]] && precisions="fp32 bf16"  # CPU autocast in fp16 is far too slow for a check
[[ $CHECKS == *" 1 "* ]] || precisions=""
for precision in $precisions; do
  name="demo-$precision"
  began=$SECONDS
  if train "$name" "$PY" -m hpc_localsgd train configs/demo.yaml --set comm.backend=single \
    --set "train.device=$DEVICE" --set "train.precision=$precision"; then
    accuracy=$(final_accuracy "$name")
    if "$PY" -c "import sys; sys.exit(float(sys.argv[1]) <= 0.9)" "$accuracy"; then
      say "1 demo $precision on $DEVICE: PASS test accuracy $accuracy (chance 0.1) in $((SECONDS - began)) s"
    else
      say "1 demo $precision on $DEVICE: FAIL test accuracy $accuracy <= 0.9 ($OUT/$name.log)"
      failed=1
    fi
  else
    say "1 demo $precision on $DEVICE: FAIL the run ended with an error: $(tail -n 1 "$OUT/$name.log")"
    failed=1
  fi
done
[[ $DEVICE == cpu && -n $precisions ]] && say "1 demo fp16: SKIP no GPU (fp16 autocast on CPUs is correct but very slow)"

# --- 2. two ranks on one GPU, and the simulation, against the CPU --------------------------------------
SMALL=(--set seed=3 --set model.name=smallcnn --set model.width=8 --set data.name=synthetic
  --set data.synthetic.train_samples=1024 --set data.synthetic.test_samples=256
  --set "data.synthetic.shape=[1, 8, 8]" --set data.synthetic.num_classes=4 --set data.batch_size=16
  --set optim.lr_per_256=3.2 --set optim.warmup_epochs=0.25 --set algorithm.method=local_sgd
  --set algorithm.sync_period=4 --set algorithm.outer=slowmo --set algorithm.slow_momentum=0.5
  --set train.max_steps=32 --set train.epochs=10 --set train.eval_every_epochs=0.25 --set train.threads=1)
# The second variant: post-local SGD, its 16 synchronous steps' gradients in bf16.
GRADIENTS=(--set algorithm.method=post_local_sgd --set algorithm.switch_step=16 --set comm.gradient_compression=bf16)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
two_workers() {  # two_workers BACKEND DEVICE [grad]: the small run with 2 workers, in $OUT/two-BACKEND-DEVICE[-grad]
  local command name="two-$1-$2${3:+-$3}" variant=()
  [[ ${3:-} == grad ]] && variant=("${GRADIENTS[@]}")
  if [[ $1 == torch ]]; then
    command=("${TORCHRUN[@]}" -m hpc_localsgd train "$EMPTY_CONFIG" --set comm.backend=torch)
  else
    command=("$PY" -m hpc_localsgd train "$EMPTY_CONFIG" --set comm.backend=simulated --set comm.simulated_workers=2)
  fi
  train "$name" "${command[@]}" "${SMALL[@]}" "${variant[@]}" --set "train.device=$2" || {
    say "2 $1, 2 workers on $2${3:+ ($3)}: FAIL the run ended with an error: $(tail -n 1 "$OUT/$name.log")"
    failed=1
    return 1
  }
}
compare() {  # compare RUN REFERENCE same-backend|other-backend: the check's line
  local path verdict
  path=$(grep -o 'torch.distributed [^,)]*\|in-process [^,)]*' "$OUT/$1.log" | head -n 1)
  if verdict=$(same_run "$1" "$2" "$3" 2>&1); then
    say "2 $1 ($path) = $2: PASS $verdict"
  else
    say "2 $1 = $2: FAIL $(tail -n 1 <<<"$verdict")"
    failed=1
  fi
}
if [[ $CHECKS != *" 2 "* ]]; then
  :
elif [[ $DEVICE == cuda ]]; then
  for backend in torch simulated; do
    for variant in "" grad; do
      suffix=${variant:+-$variant}
      two_workers "$backend" cuda $variant && two_workers "$backend" cpu $variant &&
        compare "two-$backend-cuda$suffix" "two-$backend-cpu$suffix" same-backend
    done
  done
else  # the fallback: the simulation reproduces two torch.distributed ranks on the CPU
  for variant in "" grad; do
    suffix=${variant:+-$variant}
    two_workers torch cpu $variant && two_workers simulated cpu $variant &&
      compare "two-simulated-cpu$suffix" "two-torch-cpu$suffix" other-backend
  done
  say "2 two ranks on one GPU, simulation on CUDA: SKIP no GPU"
fi

# --- 3 and 4: the benchmark's compute phases ------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
  precision_args=(--model resnet50 --batch 128 --image-size 224 --classes 1000 --precisions bf16
    --channels-last true --steps 10 --warmup 2 --repeats 5)
  simulation_args=(--model resnet18 --batch 32 --image-size 32 --classes 10 --simulated-workers 16
    --steps 4 --warmup 1 --repeats 5)
  compile_args=("${precision_args[@]}" --compile true)
else
  precision_args=(--model resnet18 --batch 8 --image-size 32 --classes 10 --precisions bf16
    --channels-last true --steps 2 --warmup 1 --repeats 2)
  simulation_args=(--model resnet18 --batch 4 --image-size 32 --classes 10 --simulated-workers 4
    --steps 2 --warmup 1 --repeats 2)
  compile_args=(--model smallcnn --batch 8 --image-size 32 --classes 10 --precisions bf16
    --channels-last true --steps 2 --warmup 1 --repeats 2 --compile true)
fi
figure() {  # figure FILE ID: "median (min … max)" of one figure of a bench JSON
  "$PY" -c "import json, sys
f = {f['id']: f for f in json.load(open(sys.argv[1]))['figures']}[sys.argv[2]]
print(f\"{f['median']:.4g} ({f['spread']['min']:.4g} … {f['spread']['max']:.4g}) {f['unit']}\" + (
    '' if f['target'] is None else f\", target {f['target']['op']} {f['target']['value']}: {'met' if f['met'] else 'MISSED'}\"))" "$@"
}
for phase in precision simulation compile; do
  [[ $phase == precision && $CHECKS != *" 3 "* || $phase == simulation && $CHECKS != *" 4 "* ]] && continue
  [[ $phase == compile && $CHECKS != *" 6 "* ]] && continue
  args_name=${phase}_args[@]
  if "$PY" -m hpc_localsgd bench --phases "${phase/compile/precision}" --device "$DEVICE" "${!args_name}" \
    --out "$OUT/bench-$phase.json" >"$OUT/bench-$phase.log" 2>&1; then
    if [[ $phase == compile ]]; then
      say "6 train.compile, ${compile_args[1]} bf16 channels-last on $DEVICE: MEASURED compiled/eager" \
        "$(figure "$OUT/bench-$phase.json" precision.bf16.compile_speedup); compiled package/compiled plain" \
        "$(figure "$OUT/bench-$phase.json" precision.bf16.compiled_vs_plain); compiled package" \
        "$(figure "$OUT/bench-$phase.json" precision.bf16.compiled_samples_per_s)"
    elif [[ $phase == precision ]]; then
      say "3 training step vs plain loop, ${precision_args[1]} bf16 channels-last on $DEVICE: MEASURED" \
        "$(figure "$OUT/bench-$phase.json" precision.bf16.vs_plain); package" \
        "$(figure "$OUT/bench-$phase.json" precision.bf16.samples_per_s)"
    else
      say "4 simulated ${simulation_args[9]} replicas of ${simulation_args[1]} vs one model in a row on $DEVICE:" \
        "MEASURED speed-up $(figure "$OUT/bench-$phase.json" simulation.speedup); batched" \
        "$(figure "$OUT/bench-$phase.json" simulation.replicated_samples_per_s)"
    fi
  else
    check=$([[ $phase == precision ]] && echo 3 || { [[ $phase == simulation ]] && echo 4 || echo 6; })
    say "$check bench ($phase): FAIL $(tail -n 1 "$OUT/bench-$phase.log")"
    failed=1
  fi
done

# --- 5. the compression codecs' cost per sync ------------------------------------------------------------
if [[ $CHECKS == *" 5 "* ]]; then
  if codecs=$("$PY" - "$DEVICE" 2>&1 <<'EOF'
import statistics
import sys
import time

import torch

from hpc_localsgd.algorithms.compression import CompressedAverager
from hpc_localsgd.comm import SingleCommunicator

device = torch.device(sys.argv[1])
numel = 25_557_032  # ResNet-50's parameters
update = torch.randn(numel, generator=torch.Generator().manual_seed(0))
line = []
for codec in ("bf16", "int8"):
    # One rank's compute per sync, as the engine does it (the collective and the sum of the others'
    # rows aside): add the error, encode, decode what it sent, keep the new error.
    averager = CompressedAverager(codec, (numel,), error_feedback=True, device=device)
    times, first = [], None
    for repeat in range(6):  # the first is a warm-up
        work = update.to(device, copy=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        averager.average_(SingleCommunicator(), work)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        first = first or (work.to("cpu", copy=True), averager.error.to("cpu", copy=True))
    # The codecs are exact arithmetic (max, divide, round, multiply): the device gives the CPU's bits.
    on_cpu = CompressedAverager(codec, (numel,), error_feedback=True)
    work = update.clone()
    on_cpu.average_(SingleCommunicator(), work)
    if not (torch.equal(first[0], work) and torch.equal(first[1], on_cpu.error)):
        counts = [int((a != b).sum()) for a, b in ((first[0], work), (first[1], on_cpu.error))]
        sys.exit(f"{codec} on {device} differs from the CPU in {counts[0]} averaged values, {counts[1]} errors")
    line.append(f"{codec} {1e3 * statistics.median(times[1:]):.1f} ms")
print(", ".join(line) + ", each equal to the CPU's bits")
EOF
  ); then
    say "5 encode + decode + error feedback of 25.6 M float32 values on $DEVICE: PASS $codecs; MEASURED median of 5"
  else
    say "5 compression codecs on $DEVICE: FAIL $(tail -n 1 <<<"$codecs")"
    failed=1
  fi
fi

# --- 8. a language model: the package's compiled step against a compiled nanoGPT-style loop ---------------------
mfu() {  # mfu FILE ID: "median% (min … max) of <peak>", or n/a and the reason the JSON gives
  "$PY" -c "import json, sys
d = json.load(open(sys.argv[1]))
basis, f = d['measurement']['mfu'], {f['id']: f for f in d['figures']}.get(sys.argv[2])
if f is None:
    print(f\"n/a ({basis['reason']})\")
else:
    peak = basis['peak_flops'][sys.argv[2].split('.')[1]]
    print(f\"{100 * f['median']:.1f}% ({100 * f['spread']['min']:.1f} … {100 * f['spread']['max']:.1f}) of \"
          f\"{peak / 1e12:.0f} TFLOP/s ({basis['device']}, {sys.argv[2].split('.')[1]} dense peak)\")" "$@"
}
if [[ $CHECKS == *" 8 "* ]]; then
  # Correctness first: configs/lm/demo.yaml in one process on the device in bf16 must learn well below its
  # corpus's unigram entropy (0.3 nats, as tests/mpi/test_language.py asks of it on CPU ranks).
  began=$SECONDS
  lm_steps=400
  if train lm-demo "$PY" -m hpc_localsgd train configs/lm/demo.yaml --set comm.backend=single \
    --set "train.device=$DEVICE" --set train.precision=bf16 --set "train.max_steps=$lm_steps"; then
    verdict=$("$PY" -c "import json, sys, h5py
from hpc_localsgd.io.metrics import read_metrics
path = sys.argv[1]
entropy = json.loads(h5py.File(path).attrs['language'])['corpus']['unigram_entropy']
loss = read_metrics(path)['evals']['test_loss'][-1]
print(('PASS' if loss < entropy - 0.3 else 'FAIL') + f' validation loss {loss:.3f} nats/byte, unigram entropy {entropy:.3f}')" \
      "$OUT/lm-demo/metrics.h5")
    [[ $verdict == PASS* ]] || failed=1
    say "8 language-model demo bf16 on $DEVICE ($lm_steps steps): $verdict in $((SECONDS - began)) s;" \
      "$(grep -o '[0-9]* tokens/s\( | MFU [^|]*\)\?' "$OUT/lm-demo.log" | tail -n 1)"
  else
    say "8 language-model demo on $DEVICE: FAIL the run ended with an error: $(tail -n 1 "$OUT/lm-demo.log")"
    failed=1
  fi
  if [[ $DEVICE == cuda ]]; then
    gpt_args=(--gpt-layers 12 --gpt-heads 12 --gpt-dim 768 --gpt-seq-len 1024 --gpt-vocab 50304 --batch 8
      --steps 10 --warmup 2 --repeats 5)
  else  # the logic on a tiny transformer
    gpt_args=(--gpt-layers 2 --gpt-heads 2 --gpt-dim 64 --gpt-seq-len 32 --gpt-vocab 256 --batch 4
      --steps 2 --warmup 1 --repeats 2)
  fi
  json="$OUT/bench-gpt.json"
  if "$PY" -m hpc_localsgd bench --model gpt --phases precision --precisions bf16 --compile true \
    --device "$DEVICE" "${gpt_args[@]}" --out "$json" >"$OUT/bench-gpt.log" 2>&1; then
    say "8 language model, GPT ${gpt_args[1]} layers x ${gpt_args[5]} wide, ${gpt_args[7]} tokens, vocabulary" \
      "${gpt_args[9]}, batch ${gpt_args[11]}, bf16 compiled on $DEVICE: MEASURED tokens/s" \
      "$(figure "$json" precision.bf16.compiled_tokens_per_s), MFU $(mfu "$json" precision.bf16.compiled_mfu)," \
      "vs plain loop $(figure "$json" precision.bf16.compiled_vs_plain); eager vs eager plain loop" \
      "$(figure "$json" precision.bf16.vs_plain)"
  else
    say "8 language model (bench --model gpt): FAIL $(tail -n 1 "$OUT/bench-gpt.log")"
    failed=1
  fi
fi

# --- 7. the sync thread on the emulated slow network, on the machine's CPUs ---------------------------------
if [[ $CHECKS == *" 7 "* ]]; then
  bundle=${IPROUTE2:-$PWD/.iproute2}
  [[ -x $bundle/bin/ip && -x $bundle/bin/tc ]] && export PATH="$bundle/bin:$PATH"
  if [[ $DEVICE == cuda ]]; then
    slownet_args=(--model resnet50 --batch 32 --image-size 32 --classes 10 --steps 12 --warmup 1 --repeats 5)
  else  # the logic on a small problem
    slownet_args=(--model smallcnn --batch 8 --image-size 32 --classes 10 --steps 4 --warmup 1 --repeats 2)
  fi
  variants=(h4_delay3 h1_int8_delay1)
  if "$PY" -m hpc_localsgd.launcher.slownet 2 1gbit -- "$(command -v "$PY")" -m hpc_localsgd bench \
    --phases streaming --streaming-variants "$(IFS=,; echo "${variants[*]}")" --backend mpi --device cpu \
    --threads 1 --compare-sync-thread true "${slownet_args[@]}" --out "$OUT/bench-slownet.json" \
    >"$OUT/bench-slownet.log" 2>&1; then
    # Efficiencies against the bare limit (the targets' figure) and against the limit measured in the same
    # repetitions (paired): where the two limits differ (limit_over_bare far from 1), trust the second.
    json="$OUT/bench-slownet.json"
    measured="ip $(command -v ip), $(nproc) cores, in-process limit over bare $(figure "$json" streaming.limit_over_bare)"
    for variant in "${variants[@]}"; do
      measured+="; $variant efficiency without the sync thread $(figure "$json" "streaming.$variant.efficiency")"
      measured+=" (in-process $(figure "$json" "streaming.$variant.efficiency_in_process")), with it"
      measured+=" $(figure "$json" "streaming.${variant}_sync_thread.efficiency") (in-process"
      measured+=" $(figure "$json" "streaming.${variant}_sync_thread.efficiency_in_process")), speed-up"
      measured+=" $(figure "$json" "streaming.$variant.sync_thread_speedup")"
    done
    say "7 sync thread off/on, emulated 1 Gb/s, 2 ranks of ${slownet_args[1]} on the CPUs: MEASURED $measured"
  else
    say "7 sync thread on the emulated network: FAIL $(tail -n 1 "$OUT/bench-slownet.log")"
    failed=1
  fi
fi

say "$([[ $failed == 0 ]] && echo "all checks passed" || echo "SOME CHECKS FAILED") in $((SECONDS - started)) s;" \
  "outputs in $OUT"
exit $failed
