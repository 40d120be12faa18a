#!/usr/bin/env bash
# Run diffusers' fast pipeline tests three times — without tokred, with tokred at ratio 0, with tokred at
# ratio 0.5 — and compare the pass/fail sets. See README.md.
#
#   tools/diffusers_tests/run.sh                      # tests/pipelines/flux and tests/pipelines/stable_diffusion_xl
#   tools/diffusers_tests/run.sh tests/pipelines/flux/test_pipeline_flux.py -k batch   # any pytest selection
#
# Environment: DIFFUSERS_SRC (a diffusers checkout with tests/, default /tmp/difftests/diffusers),
# PY (default .venv/bin/python), OUT (results, default /tmp/difftests/results), EXTRA_SITE (test-only packages,
# default /tmp/difftests/extra), TOKRED_PRESET (default toma), RATIOS (default "0 0.5"), PARALLEL=1 to run the
# configurations at the same time.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIFFUSERS_SRC=${DIFFUSERS_SRC:-/tmp/difftests/diffusers}
PY=${PY:-$REPO/.venv/bin/python}
OUT=${OUT:-/tmp/difftests/results}
EXTRA_SITE=${EXTRA_SITE:-/tmp/difftests/extra}
RATIOS=${RATIOS:-"0 0.5"}
export TOKRED_PRESET=${TOKRED_PRESET:-toma}

if [ ! -f "$DIFFUSERS_SRC/tests/pipelines/test_pipelines_common.py" ]; then
    echo "no diffusers tests under DIFFUSERS_SRC=$DIFFUSERS_SRC; see README.md (Getting the test sources)" >&2
    exit 2
fi
# diffusers' test extras that the venv lacks: parameterized and requests-mock (imported by the tests), scipy and
# torchsde (the karras schedulers test). Not tokred dependencies: a side folder, not the venv. (peft is left out: the
# LoRA tests need peft>=0.22, newer than the package index here has; without peft they are skipped.)
if ! PYTHONPATH="$EXTRA_SITE" "$PY" -c "import parameterized, requests_mock, scipy, torchsde" 2>/dev/null; then
    "$PY" -m pip install -q --target "$EXTRA_SITE" --no-deps parameterized requests-mock scipy torchsde trampoline \
        || exit 2
fi

TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(tests/pipelines/flux tests/pipelines/stable_diffusion_xl)
mkdir -p "$OUT"

export PYTHONPATH="$EXTRA_SITE:$HERE" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

run_one() {  # name, ratio ("" = no tokred)
    local name=$1 ratio=$2
    rm -f "$OUT/$name.xml" "$OUT/$name.jsonl"
    echo "[$(date +%T)] $name: TOKRED_RATIO=${ratio:-unset} ${TARGETS[*]}"
    (cd "$DIFFUSERS_SRC" && TOKRED_RATIO=$ratio TOKRED_REPORT="$OUT/$name.jsonl" \
        "$PY" -m pytest -p tokred_inject -p no:cacheprovider -q -rfEs -o junit_family=xunit1 \
        --junitxml="$OUT/$name.xml" "${TARGETS[@]}" >"$OUT/$name.log" 2>&1)
    echo "[$(date +%T)] $name: $(tail -n 1 "$OUT/$name.log")"
}

names=(base)
run_config() { if [ "$1" = base ]; then run_one base ""; else run_one "$1" "${1#ratio}"; fi; }
for r in $RATIOS; do names+=("ratio$r"); done
if [ "${PARALLEL:-0}" = 1 ]; then
    for n in "${names[@]}"; do run_config "$n" & done
    wait
else
    for n in "${names[@]}"; do run_config "$n"; done
fi

xmls=()
for n in "${names[@]}"; do xmls+=("$OUT/$n.xml"); done
"$PY" "$HERE/compare.py" "${xmls[@]}" | tee "$OUT/compare.txt"
