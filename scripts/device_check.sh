#!/usr/bin/env bash
# The GPU check: tokred bench on the full SDXL UNet and the full Flux transformer at 1024x1024 (bf16), one table.
# On a machine without network, first fetch the missing wheels here (scripts/fetch_device_wheels.sh) and carry
# .whl with the working tree; this script installs them into /tmp/site and runs tokred from the source tree.
#   scripts/device_check.sh                      # on the GPU machine (about 3-5 minutes on an H200)
#   TOKRED_CHECK_SMALL=1 scripts/device_check.sh # a dry run of the same steps on tiny models, on any machine
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tokred-out/device-check}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
EXTRA=()
if [ "${TOKRED_CHECK_SMALL:-0}" = 1 ]; then  # the same commands on tiny models, on the CPU
    EXTRA=(model_options=null height=128 width=128 repeats=1 warmup=0 device=cpu dtype=fp32)
fi
"$PYTHON" - <<'PY'
import torch, diffusers, tokred
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"tokred {tokred.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, {gpu}")
PY
for family in sdxl flux; do
    model=()
    if [ "${TOKRED_CHECK_SMALL:-0}" = 1 ]; then model=("model=tiny:$family"); fi
    "$PYTHON" -m tokred bench "scripts/gpu/$family.yaml" "${model[@]}" "${EXTRA[@]}" --out "$OUT/$family" --quiet
    echo
done
"$PYTHON" scripts/gpu/table.py "$OUT/sdxl/bench.json" "$OUT/flux/bench.json" | tee "$OUT/table.md"
