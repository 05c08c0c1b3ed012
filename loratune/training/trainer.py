"""One trial: LoRA or QLoRA fine-tuning of a base model on prepared data, and its metrics.

The loop is our own and reads top to bottom (after nanoGPT's train.py): AdamW on the LoRA
weights, a warmup + cosine/linear/constant schedule, gradient accumulation with the loss
normalized by the step's completion tokens, gradient clipping. Keeping it in our hands leaves
room for packing and fused kernels later.

Failures of the trial itself (out of memory, a NaN loss, any exception while loading or
training) are results: ``run_trial`` returns them with ``status: failed``. Bad settings are not:
they raise before any training starts.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import math
import os
import re
import resource
import shutil
import socket
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

# OpenMP threads that spin while they wait are a disaster on a shared CPU: on 2 busy cores a
# step took 3-60 s instead of 1.2 s. Sleeping waiters cost little when the CPU is free. It only
# works if set before torch loads OpenMP, and never overrides the user's choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from loratune.training import fused as fused_path  # noqa: E402
from loratune.training.data import IGNORE_INDEX, TokenizedExample, read_prepared, tokenize_examples  # noqa: E402
from loratune.training.models import (  # noqa: E402
    add_lora,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    resolve_compute_dtype,
    resolve_device,
)
from loratune.training.settings import LoraHyperparameters, TrainingSettings, resolve_trial  # noqa: E402

log = logging.getLogger(__name__)

# Libraries whose versions go into every trial's provenance.
PROVENANCE_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


class TimeLimitReached(RuntimeError):
    """The trial would outlive its job's wall-time limit: stop and record it, before Slurm kills it."""


class LossDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Progress:
    """What the loop has done so far; it outlives a failure, so a failed trial still shows how far it got."""

    loss_curve: list[float] = field(default_factory=list)
    train_tokens: int = 0
    train_time: float = 0.0


# ---- schedule and batches --------------------------------------------------------------
def plan_steps(settings: TrainingSettings, n_train: int) -> int:
    """Optimizer steps of a trial: ``max_steps``, or ``epochs`` passes over ``n_train`` examples."""
    if settings.max_steps is not None:
        return settings.max_steps
    examples_per_step = settings.batch_size * settings.gradient_accumulation
    return max(1, math.ceil(settings.epochs * n_train / examples_per_step))


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``.

    Warmup rises linearly to the peak and never starts at 0 (a wasted step in a 40-step trial);
    the decay ends just above 0 at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return 1.0 - progress
    return 1.0


def micro_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices, batch by batch, reshuffled every epoch, without end."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples, batch_size):
            yield order[start : start + batch_size]


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has attention mask 0 and label IGNORE_INDEX."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


# ---- forward, train, evaluate ----------------------------------------------------------
def summed_token_loss(model, batch: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Cross-entropy summed over the batch's label tokens (the caller divides by their count).

    Summing lets gradient accumulation weight every completion token equally, however the
    tokens fall across micro-batches.
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1.
    predicted = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        predicted.reshape(-1, predicted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def micro_batch_loss(
    model,
    fused: fused_path.FusedCausalLM | None,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    training: bool,
) -> torch.Tensor:
    """Summed loss of one micro-batch: packed through the fused path, or padded through the model."""
    if fused is not None:
        return fused.loss(fused_path.pack(examples, device), training=training)
    return summed_token_loss(model, collate(examples, pad_id, device), dtype)


def fell_back_to_eager(fused: fused_path.FusedCausalLM | None, error: BaseException) -> bool:
    """Whether ``error`` was torch.compile failing (e.g. no C compiler on a compute node) and the
    fused path now runs eager kernels instead; the caller then repeats what failed."""
    if fused is None or not fused.fall_back_to_eager(error):
        return False
    log.warning("compiled kernels failed (%s); continuing with eager kernels", _one_line(error))
    return True


def require_trainable_4bit_weights(model) -> None:
    """Refuse 4-bit weights that bitsandbytes repacked for CPU inference.

    On CPUs with AVX512-BF16, a no-grad forward of a 4-bit model in eval mode (generate, an eval
    loss) repacks its weights for a fast inference kernel that has no backward: training after
    that runs, with only a warning, and gets wrong gradients (seen: 12x too small, or none at all).
    Train first, evaluate after; this check makes a violation a failed trial instead of a quiet one.
    """
    for name, module in model.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"4-bit weights of {name} were repacked for CPU inference by an eval forward before "
                "training; load the model afresh and train before evaluating"
            )


def require_lora_gradients(model) -> None:
    """Fail when a LoRA weight got no gradient in the first step: its adapter would never train."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(trainable)} LoRA weights got no gradient (e.g. {missing[0]})")


def train(
    model,
    examples: Sequence[TokenizedExample],
    settings: TrainingSettings,
    lora: LoraHyperparameters,
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    progress: Progress,
    deadline: float | None = None,
    fused: fused_path.FusedCausalLM | None = None,
) -> None:
    """Train the LoRA weights of ``model`` in place, recording into ``progress``.

    ``fused``: train through the fused path (its memory plan is made here, from the settings);
    None: through the model's own forward. ``deadline`` (a ``time.time()`` value) stops the loop
    with ``TimeLimitReached`` once passed.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The fused path also takes AdamW's fused CUDA kernel (17 ms a step for an 8B model's r=16
    # adapters in the default multi-tensor form, H200 profile); the plain path keeps the recipe's.
    fused_adam = fused is not None and device.type == "cuda"
    optimizer = torch.optim.AdamW(
        parameters, lr=lora.learning_rate, weight_decay=settings.weight_decay, fused=True if fused_adam else None
    )
    total_steps = plan_steps(settings, len(examples))
    warmup_steps = math.floor(settings.warmup_ratio * total_steps)
    batches = micro_batches(len(examples), settings.batch_size, seed)
    require_trainable_4bit_weights(model)
    if fused is not None:
        # Plan for the largest micro-batch this trial will see (the batch order is fixed by the seed).
        upcoming = micro_batches(len(examples), settings.batch_size, seed)
        most_tokens = max(
            sum(len(examples[i].input_ids) for i in next(upcoming))
            for _ in range(total_steps * settings.gradient_accumulation)
        )

        def make_plan() -> None:
            plan = fused_path.plan_memory(
                fused,
                tokens_per_micro_batch=most_tokens,
                dropout=lora.lora_dropout,
                checkpointing=settings.gradient_checkpointing,
                dequant_cache=settings.dequant_cache,
                budget_gib=settings.memory_budget_gib,
                device=device,
                trainable_params=sum(p.numel() for p in parameters),
            )
            fused.apply_plan(plan)
            compiled = ", compiled kernels" if fused.compiled else ""
            log.info("fused path: %s%s", plan.describe(len(fused.layers)), compiled)

        make_plan()

    def forward_backward(micro: list[list[TokenizedExample]], loss_tokens: int) -> torch.Tensor:
        summed = torch.zeros((), device=device)
        for batch_examples in micro:
            loss = micro_batch_loss(
                model, fused, batch_examples, pad_id=pad_id, device=device, dtype=dtype, training=True
            )
            (loss / loss_tokens).backward()
            summed += loss.detach()
        return summed

    model.train()
    started = time.perf_counter()
    with tqdm(total=total_steps, desc="train", unit="step", file=sys.stderr, ncols=100) as bar:
        for step in range(total_steps):
            if deadline is not None and time.time() > deadline:
                raise TimeLimitReached(f"stopped after {step} of {total_steps} steps at the job's time limit")
            learning_rate = lora.learning_rate * learning_rate_factor(
                step, total_steps, warmup_steps, settings.scheduler
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            micro = [[examples[i] for i in next(batches)] for _ in range(settings.gradient_accumulation)]
            loss_tokens = sum(example.loss_tokens for batch in micro for example in batch)
            try:
                summed_loss = forward_backward(micro, loss_tokens)
            except Exception as error:
                if not fell_back_to_eager(fused, error):
                    raise
                # the same step again, with eager kernels and a plan for their memory
                make_plan()
                optimizer.zero_grad(set_to_none=True)
                summed_loss = forward_backward(micro, loss_tokens)
            progress.train_tokens += sum(len(example.input_ids) for batch in micro for example in batch)
            step_loss = summed_loss.item() / loss_tokens  # the step's one host sync
            if not math.isfinite(step_loss):
                raise LossDiverged(f"loss became {'NaN' if math.isnan(step_loss) else 'inf'} at step {step + 1}")
            if step == 0:
                require_lora_gradients(model)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.loss_curve.append(step_loss)
            progress.train_time = time.perf_counter() - started
            tokens_per_second = progress.train_tokens / progress.train_time
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
            bar.update()
            if (step + 1) % settings.log_every == 0 or step + 1 == total_steps:
                bar.write(
                    f"step {step + 1}/{total_steps} loss {step_loss:.4f} lr {learning_rate:.3g} "
                    f"{tokens_per_second:.0f} tok/s",
                    file=sys.stderr,
                )


@torch.no_grad()
def evaluate(
    model,
    examples: Sequence[TokenizedExample],
    batch_size: int,
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    fused: fused_path.FusedCausalLM | None = None,
) -> float:
    """Mean cross-entropy per completion token over ``examples``.

    Call it after training only: on the CPU, an eval forward of a 4-bit model before training
    breaks the LoRA gradients (see ``require_trainable_4bit_weights``).
    """
    model.eval()
    # Similar lengths side by side: less padding, same mean.
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    summed_loss, loss_tokens = torch.zeros((), device=device), 0
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        try:
            loss = micro_batch_loss(model, fused, chunk, pad_id=pad_id, device=device, dtype=dtype, training=False)
        except Exception as error:
            if not fell_back_to_eager(fused, error):
                raise
            loss = micro_batch_loss(model, fused, chunk, pad_id=pad_id, device=device, dtype=dtype, training=False)
        summed_loss += loss.float()
        loss_tokens += sum(example.loss_tokens for example in chunk)
    return summed_loss.item() / loss_tokens


def save_adapter(model, target: Path) -> None:
    """Save the LoRA adapter to ``target`` through a scratch folder, so it is complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---- one trial -------------------------------------------------------------------------
def choose_fused(settings: TrainingSettings, model_path: str, *, revision=None, trust_remote_code=False) -> bool:
    """Whether the trial trains through the fused path: ``fused_kernels`` true/false, or auto =
    whenever the model's architecture is supported."""
    if settings.fused_kernels is False:
        return False
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    reason = fused_path.config_unsupported_reason(config)
    if reason is None:
        return True
    if settings.fused_kernels is True:
        raise ValueError(f"training.fused_kernels: true, but the fused path does not support {reason}")
    log.info("fused path off: it does not support %s; training through the model's own forward", reason)
    return False


def resolve_compile(settings: TrainingSettings, device: torch.device) -> bool:
    """``compile``: auto compiles on CUDA only (on the CPU it costs more than it saves in a short trial)."""
    return device.type == "cuda" if settings.compile == "auto" else settings.compile


def _library_versions() -> dict[str, str | None]:
    from loratune import __version__

    versions: dict[str, str | None] = {}
    for name in PROVENANCE_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["loratune"] = __version__
    return versions


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory torch allocated; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _one_line(error: BaseException) -> str:
    message = re.sub(r"\s+", " ", str(error)).strip()
    return f"{type(error).__name__}: {message}"


def run_trial(
    hparams: Mapping[str, Any],
    settings: TrainingSettings | Mapping[str, Any],
    model_path: str,
    data_dir: str | Path,
    output_dir: str | Path,
    seed: int = 0,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` with LoRA ``hparams`` on the data in ``data_dir``; return the metrics.

    ``deadline`` (a ``time.time()`` value, e.g. a Slurm job's end minus a margin) stops training
    when passed; the trial is then recorded as failed rather than killed unrecorded.

    ``hparams`` holds ``lora_rank``, ``lora_alpha``, ``learning_rate`` and optionally
    ``lora_dropout``; a key named like a training setting overrides it for this trial. The
    adapter goes to ``output_dir``/adapter when ``settings.keep_adapter``. ``revision`` and
    ``trust_remote_code`` apply to a hub model. Raises on bad settings or data; a failure of
    the training itself comes back as ``status: failed``.
    """
    job_started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not isinstance(settings, TrainingSettings):
        settings = TrainingSettings(**settings)
    lora, settings = resolve_trial(hparams, settings)
    data = read_prepared(data_dir)
    device = resolve_device(settings.device)
    dtype = resolve_compute_dtype(settings.compute_dtype, device)
    use_fused = choose_fused(settings, model_path, revision=revision, trust_remote_code=trust_remote_code)
    checkpointing = (
        device.type == "cuda" if settings.gradient_checkpointing == "auto" else settings.gradient_checkpointing
    )
    tokenizer = load_tokenizer(model_path, revision=revision, trust_remote_code=trust_remote_code)
    train_set = [
        e for e in tokenize_examples(tokenizer, data.train, settings.max_seq_length, data.template) if e.loss_tokens
    ]
    eval_set = [
        e for e in tokenize_examples(tokenizer, data.eval, settings.max_seq_length, data.template) if e.loss_tokens
    ]
    if not train_set:
        raise ValueError(
            f"training.max_seq_length: {settings.max_seq_length} tokens leave no completion token "
            f"in any of the {len(data.train)} training examples"
        )
    metrics: dict[str, Any] = {
        "status": "failed",
        "error": None,
        "train_loss": None,
        "final_train_loss": None,
        "eval_loss": None,
        "train_time": None,
        "job_time": None,
        "tokens_per_second": None,
        "train_tokens": 0,
        "eval_tokens": sum(e.loss_tokens for e in eval_set),
        "steps": 0,
        "peak_memory_gib": None,
        "trainable_params": None,
        "total_params": None,
        "n_train_examples": len(train_set),
        "n_eval_examples": len(eval_set),
        "device": device.type,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "quantization": settings.quantization,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing if not use_fused else settings.gradient_checkpointing,
        "fused_kernels": use_fused,
        "memory_plan": None,
        "started_at": started_at,
        "hparams": asdict(lora),
        "settings": asdict(settings),
        "loss_curve": [],
        "provenance": {
            **model_fingerprint(model_path),
            "dataset_sha256": data.manifest.get("data_sha256"),
            "dataset_source_sha256": data.manifest.get("source_sha256"),
            "libraries": _library_versions(),
            "seed": seed,
            "hostname": socket.gethostname(),
        },
    }
    log.info(
        "trial: %s on %s (%s, %s), %d train / %d eval examples",
        asdict(lora),
        device,
        settings.quantization,
        metrics["compute_dtype"],
        len(train_set),
        len(eval_set),
    )
    progress = Progress()
    model = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        from transformers import set_seed

        set_seed(seed)
        model = load_base_model(
            model_path,
            quantization=settings.quantization,
            dtype=dtype,
            device=device,
            gradient_checkpointing=checkpointing,
            fused=use_fused,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        model = add_lora(
            model,
            rank=lora.lora_rank,
            alpha=lora.lora_alpha,
            dropout=lora.lora_dropout,
            target_modules=settings.target_modules,
        )
        metrics["trainable_params"], metrics["total_params"] = model.get_nb_trainable_parameters()
        fused = None
        if use_fused:
            fused = fused_path.FusedCausalLM(model, compile=resolve_compile(settings, device))
        train(
            model,
            train_set,
            settings,
            lora,
            pad_id=tokenizer.pad_token_id,
            device=device,
            dtype=dtype,
            seed=seed,
            progress=progress,
            deadline=deadline,
            fused=fused,
        )
        if fused is not None:
            plan = fused.plan
            metrics["gradient_checkpointing"] = len(plan.checkpointed) > 0
            metrics["memory_plan"] = {
                "checkpointed_layers": len(plan.checkpointed),
                "layers": len(fused.layers),
                "dequant_cache": plan.dequant_cache,
                "budget_gib": plan.budget_gib,
                "compiled": fused.compiled,
            }
        if eval_set:
            metrics["eval_loss"] = evaluate(
                model,
                eval_set,
                settings.eval_batch_size,
                pad_id=tokenizer.pad_token_id,
                device=device,
                dtype=dtype,
                fused=fused,
            )
        if settings.keep_adapter:
            save_adapter(model, Path(output_dir) / "adapter")
        curve = progress.loss_curve
        tail = max(1, math.ceil(0.1 * len(curve)))
        metrics.update(
            status="ok",
            train_loss=sum(curve) / len(curve),
            final_train_loss=sum(curve[-tail:]) / tail,
            train_time=progress.train_time,
            tokens_per_second=progress.train_tokens / progress.train_time,
        )
    except Exception as error:  # the trial failed; the study goes on (see the module docstring)
        log.error("trial failed:\n%s", traceback.format_exc())
        metrics["status"], metrics["error"] = "failed", _one_line(error)
    finally:
        metrics.update(
            steps=len(progress.loss_curve),
            loss_curve=list(progress.loss_curve),
            train_tokens=progress.train_tokens,
            peak_memory_gib=peak_memory_gib(device),
        )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metrics["job_time"] = time.perf_counter() - job_started
    return metrics
