"""How many trials share one GPU: ``resources.trials_per_gpu`` (``auto`` or a number).

A small model's trial is launch-bound: its kernels are too small to keep the GPU busy, so trials
side by side on one GPU add up. Measured on an H200 (fused trainer, random weights, several
processes training at once, tokens/s summed; issue 17): SmolLM2-135M at 8 x 512 tokens gave 4.8x
the tokens/s of one process with 4 processes and 6.7x with 8; a Llama-1B shape at 8 x 2048 and a
Llama-3-8B shape at 4 x 2048 gained nothing (0.94-0.95x). ``auto`` packs by the smallest of three
limits, each from what is known before any model loads:

* **work**: the forward and backward FLOPs of one micro-batch (6 x parameters x tokens). One
  trial fills the GPU at ``FILL_FLOPS`` (between the two measured cases: SmolLM2's 3.3e12 packs,
  the 1B shape's 1.2e14 does not); below it, ``FILL_FLOPS // work`` trials share, at most
  ``MAX_AUTO`` (the most measured; 8 SmolLM2 trials were still gaining);
* **memory**: ``MEMORY_SHARE`` of the GPU over the trial's estimated peak (``trial_peak_gib``);
* **CPU**: one core per trial (a launch-bound trial keeps one core busy).

The rule is a model fitted to two measured ends on one GPU type, not a measurement of every
shape: ``bench/throughput.py`` checks it, and a number in the config overrides it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FILL_FLOPS = 3e13
MAX_AUTO = 8
MEMORY_SHARE = 0.9
OVERHEAD_GIB = 1.0  # a CUDA context, the allocator's slack, the tokenizer and data


@dataclass(frozen=True)
class ModelShape:
    """What packing needs of a model, read from its folder without loading it."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    q_size: int  # attention heads x head dim
    kv_size: int
    vocab: int


def _safetensors_params(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, from their headers alone."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total if files else None


def model_shape(model_path: str | Path) -> ModelShape | None:
    """The shape of the model in ``model_path`` (a folder with config.json), or None when that
    is no local folder or a field is missing (then ``auto`` keeps one trial per GPU)."""
    folder = Path(model_path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        layers, intermediate, vocab = config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
        kv_size = config.get("num_key_value_heads", heads) * head_dim
    except (OSError, ValueError, KeyError, TypeError):
        return None
    params = _safetensors_params(folder)
    if params is None:  # a Llama-style count: attention, MLP, embeddings (and an untied head)
        per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_size + 3 * hidden * intermediate
        params = layers * per_layer + vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(params, layers, hidden, intermediate, heads * head_dim, kv_size, vocab)


def micro_batch_flops(shape: ModelShape, tokens: int) -> float:
    return 6.0 * shape.params * tokens


def trial_peak_gib(shape: ModelShape, tokens: int, quantization: str) -> float:
    """An upper estimate of one trial's GPU memory: the base weights (NF4: half a byte per
    parameter of the layers, the embeddings in bf16), every layer's activations kept (as the
    fused path's plan without checkpointing counts them), a chunk of logits, and an overhead."""
    embeddings = 2 * shape.vocab * shape.hidden
    layer_params = shape.params - embeddings
    weights = (0.53 * layer_params + 2 * embeddings) if quantization == "nf4" else 2 * shape.params
    per_token_layer = 2 * (2 * shape.q_size + 2 * shape.kv_size + 2 * shape.intermediate) + 10 * shape.hidden
    activations = tokens * shape.layers * per_token_layer
    logits = min(1024, tokens) * shape.vocab * 10
    return (weights + activations + logits) / 2**30 + OVERHEAD_GIB


def auto_trials_per_gpu(
    shape: ModelShape, tokens: int, quantization: str, gpu_gib: float, cpus: int
) -> tuple[int, str]:
    """``auto``'s number of trials per GPU, and why (the limit that decided it)."""
    work = micro_batch_flops(shape, tokens)
    peak = trial_peak_gib(shape, tokens, quantization)
    limits = {
        f"work {work:.2g} FLOP per micro-batch (one trial fills the GPU at {FILL_FLOPS:.2g})": min(
            MAX_AUTO, max(1, int(FILL_FLOPS // work))
        ),
        f"memory {peak:.1f} GiB per trial of {gpu_gib:.0f} GiB": max(1, int(MEMORY_SHARE * gpu_gib // peak)),
        f"{cpus} CPU cores per GPU": max(1, cpus),
    }
    reason = min(limits, key=limits.get)
    return limits[reason], reason


@functools.cache
def gpu_memory_gib(device: str) -> float | None:
    """Total memory of GPU ``device`` (an index or UUID) from ``nvidia-smi``, without touching
    CUDA in this process (see ``loratune.devices``); None where it cannot say. Asked once per
    process: Snakemake's head asks it for every trial job it schedules (``gpu_job_share``)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", device],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cpus_per_gpu(n_gpus: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // max(1, n_gpus))


def resolve_trials_per_gpu(
    setting: int | str,
    model_path: str | None,
    tokens: int,
    quantization: str,
    gpu_gib: float | None,
    cpus: int,
) -> tuple[int, str]:
    """``resources.trials_per_gpu`` for one trial: a number as given, or ``auto`` from the model's
    shape, the tokens of a micro-batch, the GPU's memory and the CPU cores (one trial per GPU
    where a shape or the GPU's size is unknown)."""
    if setting != "auto":
        return int(setting), "resources.trials_per_gpu"
    if gpu_gib is None:
        return 1, "the GPU's memory is unknown"
    shape = model_shape(model_path) if model_path else None
    if shape is None:
        return 1, f"no model shape in {model_path!r}"
    return auto_trials_per_gpu(shape, tokens, quantization, gpu_gib, cpus)


def study_trials_per_gpu(
    config: Mapping, model_path: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[int, str]:
    """How many trials of the study ``config`` may share one GPU of this machine, and why: what a
    trial job claims (``loratune.trial``) and what Snakemake's head schedules for
    (``gpu_job_share``), so both count the same slots."""
    from loratune.devices import local_pool, slurm_placed

    if config["backend"] != "qlora" or config["resources"]["gpus_per_trial"] != 1:
        return 1, "one trial per GPU: not one GPU per trial"
    if slurm_placed(environ):
        return 1, "Slurm chose the GPU of this trial's job"
    pool = local_pool(environ)
    if not pool:
        return 1, "no GPU"
    memory = [gpu_memory_gib(device) for device in pool]
    training = config["training"]
    return resolve_trials_per_gpu(
        config["resources"]["trials_per_gpu"],
        model_path,
        tokens=training["batch_size"] * training["max_seq_length"],
        quantization=training["quantization"],
        gpu_gib=None if None in memory else min(memory),
        cpus=cpus_per_gpu(len(pool)),
    )


# The local machine's GPUs as one whole of SHARE_UNITS parts: the `gpu_share` resource that
# profiles/local caps at SHARE_UNITS. Snakemake rounds a resource to an integer, so a job that may
# run beside k - 1 others asks SHARE_UNITS // k; that lets exactly k run at once for any k with
# k * (k + 1) < SHARE_UNITS.
SHARE_UNITS = 1_000_000


def gpu_job_share(
    config: Mapping,
    model_path: str | None,
    exclusive: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """The part of ``SHARE_UNITS`` a GPU job of the study asks of Snakemake's local scheduler, so
    that the default profile runs as many GPU jobs at once as this machine's GPUs take: all of it
    on a machine without GPUs (one trial at a time: it uses every core), one GPU's part per job
    of ``gpus_per_trial`` GPUs, and a slot's part (1 / (GPUs x trials per GPU)) for a trial
    that may share its GPU; nothing for a job without a GPU (benchmark trials) or in a Slurm job of
    one trial (Slurm rations the GPUs); inside a head's Slurm allocation, "this machine's GPUs" are
    the allocation's (``loratune.devices.in_allocation``). ``exclusive``: a job that takes its GPU
    alone (evaluation).
    ``model_path`` None (the model not prepared yet, as in a dry run) counts as one trial per GPU
    for ``auto``; Snakemake asks again once the job's inputs exist."""
    from loratune.devices import local_pool, slurm_placed

    gpus = config["resources"]["gpus_per_trial"] if config["backend"] == "qlora" else 0
    if gpus == 0 or slurm_placed(environ):
        return 0
    pool = local_pool(environ)
    if not pool:
        return SHARE_UNITS
    at_once = max(1, len(pool) // gpus)
    if gpus == 1 and not exclusive:
        at_once *= study_trials_per_gpu(config, model_path, environ)[0]
    return SHARE_UNITS // at_once
