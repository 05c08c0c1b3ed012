#!/usr/bin/env bash
# Build .carry/d, all that bench/train_speed.py's peers case needs in one transfer (about 30 MB):
#   .carry/d/*.whl                the wheels of .carry/a (bench/gpu/make_carry.sh: run it first)
#                                 without the GGUF part, and hf_qlora_baseline.py; setup.sh
#                                 installs them into /tmp/site as it does from .carry/a;
#   .carry/d/unsloth/*.whl        Unsloth 2026.10.9 and exactly the wheels it needs beyond the H200
#                                 image (/work/.library/device/KINDS.md, "Python packages already
#                                 there") and .carry/a (bitsandbytes, dill, multiprocess).
# Unsloth pins datasets<5, trl<=1.15 and transformers<=5.17 (the image has 5.17), so it gets a
# folder of its own (a subfolder, which setup.sh does not install): on the device,
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unsloth-site .carry/d/unsloth/*.whl
# and bench/train_speed.py runs it in a subprocess with PYTHONPATH=/tmp/unsloth-site:/tmp/site:<repo>
# (--unsloth-site /tmp/unsloth-site), so datasets 4.8.5 there shadows the 5.2.0 loratune uses.
# The set was found with `pip install --dry-run --report` against the image's versions (stub
# wheels stand for torch 2.11.0, torchvision 0.26.0, triton 3.6.0; xformers is left out: Unsloth
# falls back to torch's SDPA), minus what the image has. The Unsloth wheel is repacked without its
# Studio app (studio/: 25 MB of a web front end and its backend), as make_carry.sh trims bitsandbytes.
# Usage (repo root, with .venv set up, after make_carry.sh): bash bench/gpu/make_carry_unsloth.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
BASELINE=${BASELINE:-../shared/bench/hf_qlora_baseline.py}
ls .carry/a/bitsandbytes-*.whl >/dev/null  # built by bench/gpu/make_carry.sh
rm -rf .carry/d /tmp/loratune-unsloth && mkdir -p .carry/d/unsloth /tmp/loratune-unsloth
cp .carry/a/*.whl "$BASELINE" .carry/d/
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d /tmp/loratune-unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 \
  tyro==1.0.17 typeguard==4.6.1 docstring_parser==0.18.0 torchao==0.18.0 cut_cross_entropy==25.1.1 \
  msgspec==0.23.0 hf_transfer==0.1.9 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 diffusers==0.42.1 \
  importlib_metadata==10.2.0 lazy-importer==0.1.0
for wheel in /tmp/loratune-unsloth/*.whl; do
  case $(basename "$wheel") in
    unsloth-*) ;;
    *) cp "$wheel" .carry/d/unsloth/ ;;
  esac
done
"$PY" bench/gpu/repack_wheel.py /tmp/loratune-unsloth/unsloth-2026.10.9-py3-none-any.whl .carry/d/unsloth --drop studio/
du -sh .carry/d
