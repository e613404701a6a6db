#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (H100/H200, CUDA 13, PyTorch, CuPy and
# cuda-bindings installed; no TensorRT, no onnxruntime-gpu; nothing downloadable): about 10
# minutes at most, each step under its own time limit, results under $OUT (default
# bench/results/gpu_check):
#
#   steps.tsv                  step, exit status, seconds (124: its time limit)
#   preflight.log              the GPU, versions, the server's imports (stops here if missing)
#   checks.json                CUDA-layer round trips and graph capture; the TensorRT instance
#                              driven by a stand-in engine whose work is a CuPy kernel
#   pytest.xml, pytest.log     tests/gpu (PyTorch on CUDA; the others skip, saying why) and
#                              the CUDA layer's unit tests
#   gpu_backends_cnn.json      ours vs in-process PyTorch, the example CNN, 1 and 64 in flight
#   gpu_backends_resnet50.json the same on a ResNet-50-sized network
#
#   OUT=/tmp/out bench/gpu_check.sh        (PYTHON=... picks the interpreter)
#
# Without a GPU every step still runs and says why it skipped: CI checks the script so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run it, its output in $OUT/NAME.log
    local name=$1 limit=$2 started status
    shift 2
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - started ))" >> "$OUT/steps.tsv"
    echo "$name: exit $status (log $OUT/$name.log)"
    return "$status"
}

preflight() {
    nvidia-smi || echo "no nvidia-smi"
    "$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "cupy", "cuda.bindings", "numpy", "grpc", "onnxruntime", "tritonclient",
             "uvloop", "prometheus_client", "hdrh", "pytest", "server._native"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except ImportError as exc:
        print(f"{name}: MISSING ({exc})")
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
PY
    # The server cannot start without these: stop early rather than spend the device time.
    "$PYTHON" -c "import grpc, onnxruntime, tritonclient.grpc, uvloop, prometheus_client, server.app"
}

export -f preflight
export PYTHON
if ! step preflight 60 bash -c preflight; then
    echo "preflight failed: see $OUT/preflight.log (the server's dependencies must be there)"
    exit 1
fi
if ! "$PYTHON" -c "import server._native" 2> /dev/null; then
    export PEREGRINE_NATIVE=0  # built for another Python: the pure-Python codec and packing
fi
step checks 90 "$PYTHON" -m bench.studies.gpu_check --out "$OUT/checks.json"
step pytest 180 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/gpu \
    tests/unit/gpu/test_cuda_layer.py --junitxml "$OUT/pytest.xml"
for model in cnn resnet50; do
    step "bench_$model" 140 "$PYTHON" -m bench.studies.gpu_backends --model "$model" \
        --runtimes torch,torch_graphs --batch-sizes 1,8 --concurrency 1,64 --seconds 4 \
        --repeats 1 --output "$OUT/gpu_backends_$model.json"
done
echo "done: $OUT/steps.tsv"
