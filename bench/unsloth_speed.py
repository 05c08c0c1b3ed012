"""Unsloth's QLoRA training speed and peak memory on a random-weight Llama model: the peer point of
bench/train_speed.py's ``peers`` case, run by it in a subprocess of its own (Unsloth patches
transformers and peft when imported, and its wheels pin other versions: bench/gpu/make_carry_unsloth.sh).

Same measure as the rest of the bench: NF4 weights, bf16 compute, LoRA on every linear layer with
dropout 0, Unsloth's own offloaded gradient checkpointing, AdamW, ``--warmup`` then ``--steps``
timed steps of ``--batch`` x ``--seq`` random tokens; prints one JSON line.

    PYTHONPATH=/tmp/unsloth-site:/tmp/site python3 bench/unsloth_speed.py --model /tmp/anchor_models/llama3-8b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ensure_tokenizer(model_dir: Path) -> None:
    """A random-weight model folder has no tokenizer, and Unsloth loads one with the model: save a
    small word-level tokenizer there (training feeds token ids directly; its vocabulary is unused)."""
    if (model_dir / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(252)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    ensure_tokenizer(args.model)
    started = time.time()
    import unsloth  # first: it patches transformers and peft
    from unsloth import FastLanguageModel

    import torch

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(args.model), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=ALL_LINEAR,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    load_s = time.time() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    torch.manual_seed(0)
    ids = torch.randint(0, 128000, (args.batch, args.seq), device="cuda")
    model.train()
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            timed = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    step_s = (time.time() - timed) / args.steps
    record = dict(
        trainer=f"unsloth {unsloth.__version__} (offloaded checkpointing)",
        tokens_per_s=round(args.batch * args.seq / step_s),
        step_s=round(step_s, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
        load_s=round(load_s, 1),
        loss_last=round(loss.item(), 3),
    )
    print("UNSLOTH_RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
