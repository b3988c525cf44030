#!/usr/bin/env bash
# Issue 8's GPU checks in one command, on a CUDA machine with no package registry:
#   here:   make .venv/.installed && bash ../shared/gpu/prepare.sh      # builds .gpu/
#   there:  bash bench/gpu_check.sh          (the device tool: run with carry [".gpu"])
# It runs the whole suite, the demo in fp32 and fp16, the embedder against the forward-only
# limit (fp32/fp16 x batch 64/256) and the simulated-device bench (about 10 minutes), and
# writes every output under $OUT (the device tool's folder) or bench/results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
# shellcheck disable=SC1091
source .gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
step() {  # step NAME SECONDS COMMAND...: run with a bound, keep its output, report its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "== $name: rc=$? in $((SECONDS - start)) s; last lines:"
    tail -n "${TAIL:-4}" "$out/$name.txt"
}
TAIL=3 step tests 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests \
    --ignore tests/integrations/test_fastapi_example.py -x
TAIL=16 step demo-fp32 60 python3 -m batchio demo --device cuda
TAIL=16 step demo-fp16 60 python3 -m batchio demo --device cuda --dtype float16
TAIL=5 step embedder-vs-forward 150 python3 -m bench.bench_gpu --device cuda \
    --json "$out/bench_gpu.json"
TAIL=3 step pipeline 60 python3 -m bench.bench_pipeline --quick
echo "== all outputs in $out"
