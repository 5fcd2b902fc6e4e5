#!/usr/bin/env bash
# Run on a lent GPU machine (see docs/benchmarks.md): GPU tests, then the GPU benchmark.
# Usage: bash benchmarks/gpu.sh [tests|bench|attention|compile] ; logs go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
  bench)
    python3 -m seqgraph bench --device cuda --sizes fastrnns --peers cudnn,eager,seqgraph-torch,seqgraph-triton \
      --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_fp32.log" | tail -20
    python3 -m seqgraph bench --device cuda --dtype bfloat16 --sizes fastrnns,smallbatch \
      --peers cudnn,eager,seqgraph-torch,seqgraph-triton --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_bf16.log" | tail -20 ;;
  attention)
    python3 benchmarks/attention_decoder.py 30 32 256 32 1 9 cuda 2>&1 | tee "$OUT/attention.log" | tail -20 ;;
  compile)
    python3 -m seqgraph bench --device cuda --sizes fastrnns --cells lstm,layer_norm_lstm,mufuru \
      --peers cudnn,torch.compile,seqgraph-triton --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_compile.log" | tail -20 ;;
esac
