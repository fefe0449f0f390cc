#!/usr/bin/env bash
# The prepared GPU check: one GPU, at most 9 minutes, run from the repository root.
#
#   bash benchmarks/gpu_check.sh            # writes its logs to $OUT (default ./gpu-check-out)
#
# 1. the CUDA tests (pytest -m gpu): bf16 training and evaluation, streamed input with workers and
#    pinned memory resuming on the GPU, a one-rank NCCL group reducing scalars on the device;
# 2. benchmarks/gpu_throughput.py: ViT-B/16-shaped training and evaluation images/s and MFU, the
#    loader alone with every core, GPU JPEG decode, and the same step run the reference code's way
#    (fp32, PIL float loader, non-fused AdamW) for a ratio on the same GPU;
# 3. benchmarks/methods_synthwild.py --device cuda: every method's synthwild preset trained and
#    evaluated on the GPU (ID/OOD next to the CPU numbers in the notes; bf16 autocast moves them a little).
#
# On a machine whose Python lacks packages rftlib needs (the lent GPU image has torch, torchvision,
# pandas, pytest, timm, huggingface_hub but not open_clip), put their wheels in .whl/ beforehand
# (open_clip_torch, ftfy, wcwidth; pure Python) and carry that folder: they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RFT_PROGRESS=off PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RFT_CACHE_DIR=${RFT_CACHE_DIR:-/tmp/rftlib-cache}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/rft-site .whl/*.whl && \
    export PYTHONPATH="$PYTHONPATH:/tmp/rft-site"
fi
nvidia-smi --query-gpu=name,power.limit,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== CUDA tests" | tee "$OUT/gpu_tests.txt"
timeout 170 $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee -a "$OUT/gpu_tests.txt"
tests=${PIPESTATUS[0]}

echo "== throughput" | tee "$OUT/throughput.txt"
timeout 220 $PY benchmarks/gpu_throughput.py 2>&1 | tee -a "$OUT/throughput.txt"
bench=${PIPESTATUS[0]}

echo "== methods on synthwild, cuda" | tee "$OUT/methods_cuda.txt"
timeout 150 $PY benchmarks/methods_synthwild.py --device cuda 2>&1 | tee -a "$OUT/methods_cuda.txt"
methods=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench, methods exit $methods"
exit $(( tests != 0 || bench != 0 || methods != 0 ))
