#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (it has no network): run once before scripts/device_check.sh.
# The device machine's image has Python 3.12 with torch, transformers, accelerate, pluggy, matplotlib, tqdm,
# numpy, safetensors, huggingface-hub; tokred needs these beside them. They land in .whl/ (git-ignored,
# carried to the machine with `carry: [".whl"]`; about 9 MB).
#   PYVER=3.11 scripts/fetch_device_wheels.sh   # wheels for another Python (the dry run here uses 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib-metadata==10.2.0 omegaconf==2.4.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 tomesd==0.1.3
ls .whl
du -sh .whl
