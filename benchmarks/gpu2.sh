#!/usr/bin/env bash
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_triton_backend.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
timeout 200 python3 -m seqgraph bench --device cuda --sizes fastrnns --cells lstm,gru,layer_norm_lstm,mufuru --peers cudnn,seqgraph-torch,seqgraph-triton --reps 10 --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_fp32.log" | tail -14
timeout 150 python3 -m seqgraph bench --device cuda --dtype bfloat16 --sizes fastrnns,smallbatch --cells lstm,layer_norm_lstm,mufuru --peers cudnn,seqgraph-triton --reps 10 --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_bf16.log" | tail -12
