#!/usr/bin/env bash
# fkd bench at the seed notebook's scale on one GPU: 224 px, batch 64, ResNet-18 teacher (random
# weights), seed_cnn student (the notebook's DeeperStudentCNN), synthetic images of that shape: no
# download, no network. Prints one table per run, most important first; the whole script stops
# itself after BUDGET seconds (default 285, under 5 minutes), compilation included.
#
#   bash bench/gpu.sh                 # from anywhere; it runs from the repository root
#   STEPS=50 BUDGET=600 bash bench/gpu.sh
#   bash bench/gpu.sh protocol        # only the CIFAR-100 protocol line (section 5), within PROTOCOL_BUDGET
#
# Written for a machine whose python3 has torch, torchvision and fkd's dependencies (attrs, click,
# numpy) but not fkd itself: the repository root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
STEPS="${STEPS:-30}"
BUDGET="${BUDGET:-285}"
CONFIG=configs/bench/notebook224.toml

"$PY" - <<'PYEOF' || exit 1
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    raise SystemExit("bench/gpu.sh needs a CUDA device")
print("device:", torch.cuda.get_device_name(0))
PYEOF

bench() {  # bench TITLE ARGS...: one run and its table, within what is left of the budget
    local title="$1"; shift
    local left=$((BUDGET - SECONDS))
    echo
    echo "=== ${title}"
    if [ "$left" -lt 30 ]; then
        echo "(skipped: ${left} s of the ${BUDGET} s budget left)"
        return
    fi
    local start=$SECONDS
    timeout "$left" "$PY" cli.py bench --config "${BENCH_CONFIG:-$CONFIG}" --device cuda --steps "$STEPS" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "(stopped at the ${BUDGET} s budget; raise BUDGET or run this line alone)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "(exit code $rc)"
    echo "(${title}: $((SECONDS - start)) s, model building and torch.compile included)"
}

# 5. The field's protocol (CIFAR-100, resnet32x4 -> resnet8x4, KD, 240 epochs, batch 64) on synthetic data:
#    images/s of the imperative loop, fkd eager / compiled / CUDA graphs / TF32 / bf16 + channels_last / a
#    cached teacher / 8 students as one population, and the projected wall time of the whole protocol
#    (docs/protocol.md). Its own budget, PROTOCOL_BUDGET seconds (default 240), compilation included.
protocol() {
    local left=$((BUDGET - SECONDS)) budget="${PROTOCOL_BUDGET:-240}"
    [ "$left" -lt "$budget" ] && budget=$left
    echo
    echo "=== CIFAR-100 protocol, resnet32x4 -> resnet8x4 KD, 8 seeds (bench/protocol.py)"
    if [ "$budget" -lt 60 ]; then echo "(skipped: ${budget} s of the budget left; run: bash bench/gpu.sh protocol)"; return; fi
    local start=$SECONDS
    timeout "$budget" "$PY" bench/protocol.py --config configs/cifar100/resnet32x4_resnet8x4/kd.toml \
        --members 8 --device cuda --steps "${PROTOCOL_STEPS:-40}" --windows 3 --warmup 8
    local rc=$?
    [ $rc -eq 124 ] && echo "(stopped at ${budget} s; raise PROTOCOL_BUDGET or pass fewer --variants)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "(exit code $rc)"
    echo "(protocol: $((SECONDS - start)) s, torch.compile of each variant included)"
}
if [ "${1:-}" = protocol ]; then
    BUDGET="${PROTOCOL_BUDGET:-540}"
    PROTOCOL_BUDGET="$BUDGET" protocol
    exit 0
fi

# 1. A sweep of K = 8 seed_cnn students at 32 px (digits, logit KD): as `fkd sweep` runs them on this
#    device (vmapped, compiled) against 8 single-student steps one after another (issue target: >= 3x).
BENCH_CONFIG=configs/logit.toml bench "sweep of 8 students, seed_cnn at 32 px" --sweep 8 --set train.compile=on
# 2. Feature KD as in the notebook (0.7 CE + 0.3 hint, student block2 <- teacher layer1), fp32, every
#    variant; compiled, student_only and cached are compiled (configs/bench/notebook224.toml: compile on).
bench "feature KD, fp32" --variants imperative,functional,compiled,student_only,cached
# 3. The CUDA fast path: bf16 autocast + channels_last, the imperative baseline with the same settings.
bench "feature KD, bf16 + channels_last" --variants imperative,compiled \
    --set train.precision=bf16 --set train.channels_last=true
# 4. Logit KD (Hinton et al.: T = 2, 0.7 KD + 0.3 CE), fp32.
bench "logit KD, fp32" --variants imperative,functional,compiled --set distill.method=logit
protocol
# 6. End to end on digits: `sweep --seeds 8` against `distill` runs one after another (the teacher is
#    fitted first and shared; the README's CPU comparison is the same pair of commands).
e2e() {  # e2e TITLE ARGS...: one timed command within what is left of the budget
    local title="$1"; shift
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then echo "(${title} skipped: ${left} s of the budget left)"; return; fi
    local start=$SECONDS
    timeout "$left" "$PY" cli.py "$@" --device cuda --quiet >/dev/null
    echo "${title}: exit $?, $((SECONDS - start)) s wall clock"
}
echo
echo "=== end to end, configs/logit.toml on digits"
E2E_OUT="${E2E_OUT:-$(mktemp -d)}"
e2e "teacher fit" teacher --config configs/teacher.toml
for seed in 0 1; do
    e2e "distill --seed ${seed}" distill --config configs/logit.toml --seed "$seed" --out "${E2E_OUT}/distill-${seed}"
done
e2e "sweep --seeds 8" sweep --config configs/logit.toml --seeds 8 --out "${E2E_OUT}/sweep"
[ -f "${E2E_OUT}/sweep/sweep_summary.json" ] && "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=1)[:1500])" "${E2E_OUT}/sweep/sweep_summary.json"
echo
echo "total: ${SECONDS} s"
