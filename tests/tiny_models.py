"""A tiny random-weight Llama and a tiny byte-level BPE tokenizer, built locally for the training tests.

Nothing comes from a hub: the tokenizer is trained in milliseconds on a few sentences, the
model has two layers of width 64, so a training step takes milliseconds on the CPU.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "### Instruction:\nReverse the letters of the word.\n\n### Input:\ngarden\n\n### Response:\nnedrag",
    "### User:\nHello there\n\n### Assistant:\nHi! How can I help?",
    "Add the two numbers. 12 + 44 = 56. Convert 3 km to meters: 3000 m.",
    "The quick brown fox jumps over the lazy dog. A tiny model learns a tiny task.",
]


def build_tokenizer():
    """A byte-level BPE with BOS/EOS/PAD; it adds BOS in front of every text, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_llama(folder: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """Save a 2-layer, width-64 LlamaForCausalLM with random weights and the tiny tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_alpaca(path: Path, n: int = 24) -> Path:
    """``n`` one-line instructions in alpaca form ("Repeat the word number i." -> "word i")."""
    import json

    rows = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_qlora_study(folder: Path) -> dict:
    """tests/configs/tiny_qlora.yaml with the tiny model and the alpaca rows, built in ``folder``."""
    from conftest import load_test_config

    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(folder / "tiny-llama"))
    config["dataset"]["path"] = str(write_alpaca(folder / "data.jsonl"))
    return config
