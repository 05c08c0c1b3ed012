"""resources.trials_per_gpu: auto packs small models and leaves a model that fills the GPU alone."""

from __future__ import annotations

import json
import struct

import pytest

from loratune import packing

# The shapes of the measurement (issue 17): SmolLM2-135M, a Llama-3.2-1B and a Llama-3-8B shape.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
H200_GIB = 139.8


def model_folder(tmp_path, config, name="m"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "config, tokens, expected",
    [(SMOLLM2, 8 * 512, 8), (LLAMA_1B, 8 * 2048, 1), (LLAMA_8B, 4 * 2048, 1)],
    ids=["smollm2-8x512", "1b-8x2048", "8b-4x2048"],
)
def test_auto_packs_what_the_measurement_says_pays(tmp_path, config, tokens, expected):
    n, why = packing.resolve_trials_per_gpu("auto", model_folder(tmp_path, config), tokens, "nf4", H200_GIB, 16)
    assert n == expected, why
    assert 1.2e8 < packing.model_shape(model_folder(tmp_path, config, "again")).params < 9e9


def test_memory_cpu_and_a_fixed_number_limit_the_packing(tmp_path):
    smol = model_folder(tmp_path, SMOLLM2)
    assert packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", 10.0, 16)[0] == 2  # 10 GiB: two fit
    n, why = packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", H200_GIB, 3)
    assert (n, why) == (3, "3 CPU cores per GPU")
    assert packing.resolve_trials_per_gpu(5, smol, 4096, "nf4", H200_GIB, 16) == (5, "resources.trials_per_gpu")
    assert packing.resolve_trials_per_gpu("auto", smol, 4096, "nf4", None, 16)[0] == 1  # GPU size unknown
    assert packing.resolve_trials_per_gpu("auto", "meta-llama/x", 4096, "nf4", H200_GIB, 16)[0] == 1  # no folder


def test_parameters_come_from_the_safetensors_headers(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    header = json.dumps({"a": {"dtype": "BF16", "shape": [10, 20], "data_offsets": [0, 400]},
                         "__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(400))
    assert packing.model_shape(folder).params == 200
