"""The random-weight Llama shapes the GPU benchmarks measure, in one place.

The same shapes as ../shared/bench/hf_qlora_baseline.py (the plain transformers+peft loop that
bench/train_speed.py runs beside our trainer), so a throughput or packing number of a shape is
comparable with its training-speed number; tests/test_bench.py holds the two files equal.
"""

SHAPES = {
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
# What every shape shares: Llama 3's vocabulary, context and RoPE base, in bf16.
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16")


def config_kwargs(shape: str) -> dict:
    """The ``LlamaConfig`` keyword arguments of ``shape``."""
    return {**LLAMA3, **SHAPES[shape]}
