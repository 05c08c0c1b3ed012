"""Base models: resolving a ModelSpec, the weights fingerprint, and the builtin GGUF conversion."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from loratune.training import ModelSpec, prepare_model
from loratune.files import atomic_write_json
from loratune.training.models import BUILTIN_GGUF, FINGERPRINT_FILE, SOURCE_FILE, builtin_gguf_path, model_fingerprint
from loratune.training.settings import BUILTIN_MODELS
from tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # Not conftest's shared tiny_model: the fingerprint test writes a fake cached hash into this
    # folder, which the training tests' provenance would then read.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_local_folder_passes_through(tiny_model, tmp_path):
    assert prepare_model(ModelSpec(name=str(tiny_model)), cache_dir=tmp_path) == str(tiny_model)
    assert not list(tmp_path.iterdir())


def test_hub_id_downloads_once_into_the_cache(tmp_path, monkeypatch):
    # The hub is out of reach here: record what would be asked of it instead.
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = ModelSpec(name="meta-llama/Meta-Llama-3-8B", revision="main")
    path = prepare_model(spec, cache_dir=tmp_path)
    assert path == str(tmp_path / "meta-llama--Meta-Llama-3-8B")
    (call,) = calls
    assert call["repo_id"] == "meta-llama/Meta-Llama-3-8B" and call["revision"] == "main"
    assert "original/*" in call["ignore_patterns"]  # the 16 GB consolidated checkpoint is not needed


def test_bad_model_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^model\.name: no such file or directory: .*nowhere$"):
        prepare_model(ModelSpec(name=str(tmp_path / "nowhere")), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^model\.name: no such file or directory: \./relative/model$"):
        prepare_model(ModelSpec(name="./relative/model"), cache_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match=r"^model\.name: .*weights\.bin is a file but not a \.gguf"):
        prepare_model(ModelSpec(name=str(tmp_path / "weights.bin")), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^model\.name: .*empty has no config\.json"):
        prepare_model(ModelSpec(name=str(tmp_path / "empty")), cache_dir=tmp_path)


def test_every_builtin_model_name_has_a_gguf_source():
    assert set(BUILTIN_MODELS) == set(BUILTIN_GGUF)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"name": "builtin:llama-9000"},
            r"^model\.name: unknown 'builtin:llama-9000'; choose one of \['builtin:smollm2-135m'\]",
        ),
        ({"name": " "}, r"^model\.name: expected a non-empty string"),
        ({"revision": 3}, r"^model\.revision: expected a string or null"),
        ({"trust_remote_code": "yes"}, r"^model\.trust_remote_code: expected true or false"),
    ],
)
def test_model_spec_validation(options, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**options)


def test_fingerprint_is_the_weights_sha256_and_is_cached(tiny_model):
    weights = tiny_model / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tiny_model / FINGERPRINT_FILE).unlink(missing_ok=True)
    assert model_fingerprint(str(tiny_model)) == {"model": str(tiny_model), "model_sha256": expected}
    cache = tiny_model / FINGERPRINT_FILE
    assert json.loads(cache.read_text())["sha256"] == expected
    # The cache answers while the weights' name, size and mtime are unchanged ...
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "sha256": "from-cache"}))
    assert model_fingerprint(str(tiny_model))["model_sha256"] == "from-cache"
    # ... and is ignored once the weights file changes.
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_fingerprint(str(tiny_model))["model_sha256"] == expected
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M") == {
        "model": "HuggingFaceTB/SmolLM2-135M",
        "model_sha256": None,
    }


@pytest.mark.slow
def test_builtin_gguf_is_converted_once_and_cached(tmp_path):
    try:
        gguf = builtin_gguf_path("builtin:smollm2-135m")
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(ModelSpec(), cache_dir=tmp_path / "models")
    model_dir = tmp_path / "models" / "smollm2-135m"
    assert path == str(model_dir)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m"]  # no scratch left
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["source"] == "builtin:smollm2-135m"
    assert source["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert model_fingerprint(path)["model"] == "builtin:smollm2-135m"
    assert json.loads((model_dir / "config.json").read_text()).get("quantization_config") is None
    # The GGUF's own special tokens, whatever transformers version converted it (5.17 made EOS <|im_start|>).
    specials = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    assert source["special_tokens"] == specials

    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model(ModelSpec(), cache_dir=tmp_path / "models") == path
    assert weights.stat().st_mtime_ns == mtime  # not converted again

    # The converted weights are the real model: it still knows its capitals.
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.num_parameters() > 130e6 and model.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert {name: getattr(tokenizer, name) for name in specials} == specials

    # A conversion from before the special tokens were recorded may carry a wrong EOS: converted again.
    atomic_write_json(model_dir / SOURCE_FILE, {k: v for k, v in source.items() if k != "special_tokens"})
    assert prepare_model(ModelSpec(), cache_dir=tmp_path / "models") == path
    assert weights.stat().st_mtime_ns != mtime and "special_tokens" in json.loads((model_dir / SOURCE_FILE).read_text())
    shutil.rmtree(model_dir)  # 257 MiB: pytest keeps the last three runs' temporaries
