#!/usr/bin/env bash
# What a lent GPU machine checks (see README "On a GPU"): the CUDA tests, the loss benchmark in
# float32 and bf16, and the default OPD job at TP=1. Python 3.12 wheels of the dependencies the
# machine lacks are expected in .devwhl/ (pip download ... -d .devwhl); results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
what=${1:-tests,bench}
if ls .devwhl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devwhl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)"
python3 -c "import transformer_engine" 2>/dev/null && echo "transformer_engine: present" || echo "transformer_engine: absent (local spec)"
if [[ $what == *tests* ]]; then
  timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [[ $what == *bench* ]]; then
  for dtype in float32 bfloat16; do
    timeout 200 python3 -m megatron_opd.losses.bench --dtype "$dtype" --repeats 3 2>&1 | grep -v Warning | tee "$OUT/bench-$dtype.log"
  done
fi
if [[ $what == *opd* ]]; then
  start=$(date +%s)
  timeout 500 python3 -m megatron_opd.cli run configs/tiny/opd.yaml run.output_dir=/tmp/opd-runs run.nproc=1 parallel.tp=1 \
    > "$OUT/opd.log" 2>&1; echo "opd job exit $? after $(( $(date +%s) - start )) s"
  tail -30 "$OUT/opd.log"; cp /tmp/opd-runs/*/summary.json /tmp/opd-runs/*/curves.png "$OUT/" 2>/dev/null
fi
