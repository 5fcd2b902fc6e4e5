#!/usr/bin/env bash
# Lent-GPU check after the direct-store and layer-norm changes: GPU tests, torch.compile test, bench.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_triton_backend.py tests/kernels/test_launch.py tests/kernels/test_codegen.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_custom_ops.py 2>&1 | tail -2
timeout 100 python3 -m seqgraph bench --device cuda --sizes fastrnns --cells lstm,layer_norm_lstm,mufuru --peers cudnn,seqgraph-triton --reps 10 --out "$OUT/benchmarks.md" 2>&1 | grep "^|"
timeout 60 python3 -m seqgraph bench --device cuda --dtype bfloat16 --sizes fastrnns,smallbatch --cells lstm,layer_norm_lstm --peers cudnn,seqgraph-triton --reps 10 --out "$OUT/benchmarks.md" 2>&1 | grep "^|"
