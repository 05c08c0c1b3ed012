"""Data shipped with loratune: ``instructions.jsonl``, the builtin fine-tuning set, and its generator."""
