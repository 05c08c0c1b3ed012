"""One trial: LoRA or QLoRA fine-tuning of a base model on prepared data, and its metrics.

``run_trial`` reads as a recipe (after torchtune's lora_finetune_single_device): ``prepare``
the inputs (bad settings or data raise here, before any model loads), ``setup`` the model,
adapters, fused path and optimizer (from the trial's saved state, if it has one),
``train_and_evaluate`` along the learning curve, and ``record`` the metrics. The loop is our own
and reads top to bottom (after nanoGPT's train.py): AdamW on the LoRA weights, a warmup +
cosine/linear/constant schedule over the full budget, gradient accumulation with the loss
normalized by the step's completion tokens, gradient clipping.

A trial evaluates its held-out loss at the steps of ``training.eval_every`` and at the step it
stops at; after each evaluation short of the budget it saves its training state
(``loratune.training.state``), so a trial stopped at a rung (``until_step``), out of time or
preempted continues exactly where it was. ``training.select`` picks the evaluated step whose
values become the objectives and whose adapter is kept.

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

from loratune.files import atomic_write_json  # noqa: E402
from loratune.training import fused as fused_path  # noqa: E402
from loratune.training import state as saved  # noqa: E402
from loratune.training.data import (  # noqa: E402
    IGNORE_INDEX,
    PreparedData,
    TokenizedExample,
    read_prepared,
    tokenize_examples,
)
from loratune.training.metrics import ADAPTER_STEP_FILE, TrialMetrics  # noqa: E402
from loratune.training.models import (  # noqa: E402
    BaseModels,
    add_lora,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    resolve_compute_dtype,
    resolve_device,
)
from loratune.training.settings import (  # noqa: E402
    DEFAULT_EVALUATIONS,
    LoraHyperparameters,
    TrainingSettings,
    resolve_trial,
)

log = logging.getLogger(__name__)

# Libraries whose versions go into every trial's provenance.
PROVENANCE_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


class TimeLimitReached(RuntimeError):
    """The trial would outlive its job's wall-time limit: stop and record it, before Slurm kills it."""


class LossDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Progress:
    """What the trial has done so far, over all its jobs; it outlives a failure, so a failed trial
    still shows how far it got, and it is saved with the state, so a resumed one goes on counting."""

    loss_curve: list[float] = field(default_factory=list)
    train_tokens: int = 0
    train_time: float = 0.0  # seconds in training steps, evaluations excluded
    curve: list[dict[str, Any]] = field(default_factory=list)  # one point per evaluated step
    segments: list[dict[str, Any]] = field(default_factory=list)  # the earlier jobs of a resumed trial

    @property
    def steps(self) -> int:
        return len(self.loss_curve)

    def selected(self, select: str) -> dict[str, Any] | None:
        """The curve point whose values the trial reports: the lowest eval_loss (``best``; the
        earliest of equals) or the last point; None before the first evaluation."""
        evaluated = [point for point in self.curve if point["eval_loss"] is not None]
        if select == "last" or not evaluated:
            return self.curve[-1] if self.curve else None
        return min(evaluated, key=lambda point: point["eval_loss"])


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


def micro_batches(n_examples: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Example indices, batch by batch, reshuffled every epoch, without end, from the ``start``-th
    batch on: a resumed trial draws the same order and skips what it has trained."""
    generator = torch.Generator().manual_seed(seed)
    batch = 0
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for first in range(0, n_examples, batch_size):
            if batch >= start:
                yield order[first : first + batch_size]
            batch += 1


def evaluation_steps(total_steps: int, eval_every: int | None) -> list[int]:
    """The steps (1-based, after the step) at which the held-out loss is measured; always the last.

    ``eval_every`` None: DEFAULT_EVALUATIONS points spread evenly; 0: the last step only.
    """
    if eval_every is None:
        steps = {math.ceil(total_steps * k / DEFAULT_EVALUATIONS) for k in range(1, DEFAULT_EVALUATIONS + 1)}
    elif eval_every == 0:
        steps = set()
    else:
        steps = set(range(eval_every, total_steps + 1, eval_every))
    return sorted(steps | {total_steps})


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


# ---- forward and evaluate ----------------------------------------------------------
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
    ``load_base_model`` turns the repacking off (``models.keep_4bit_weights_trainable``); this
    check, before every stretch of training, makes a model repacked some other way (loaded
    elsewhere, a bitsandbytes whose trigger changed) a failed trial instead of a quiet one.
    """
    for name, module in model.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"4-bit weights of {name} were repacked for CPU inference by an eval forward; load "
                "the model with load_base_model, which keeps them trainable"
            )


def require_lora_gradients(model) -> None:
    """Fail when a LoRA weight got no gradient in a step: its adapter would never train."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(trainable)} LoRA weights got no gradient (e.g. {missing[0]})")


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

    Safe in the middle of training, also for a 4-bit model on the CPU: ``load_base_model`` keeps
    bitsandbytes from repacking its weights in this eval-mode no-grad forward
    (``models.keep_4bit_weights_trainable``), and the fused path never calls bitsandbytes' forward.
    The next ``train`` puts the model back in training mode.
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


# ---- the optimizer step and the loop ---------------------------------------------------
class Trainer:
    """The LoRA weights of ``model``, their AdamW optimizer, and one optimizer step at a time.

    ``fused``: train through the fused path (plan its memory first, ``fused.fit_memory(
    trainer.memory_request())``); None: through the model's own forward. The data order and the
    learning rate are functions of the step and ``seed``, so any step can come next (a resumed trial).
    """

    def __init__(
        self,
        model,
        examples: Sequence[TokenizedExample],
        settings: TrainingSettings,
        lora: LoraHyperparameters,
        *,
        pad_id: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        fused: fused_path.FusedCausalLM | None = None,
    ):
        self.model, self.examples, self.settings, self.lora, self.fused = model, examples, settings, lora, fused
        self.pad_id, self.device, self.dtype, self.seed = pad_id, device, dtype, seed
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        # The fused path also takes AdamW's fused CUDA kernel (17 ms a step for an 8B model's r=16
        # adapters in the default multi-tensor form, H200 profile); the plain path keeps the recipe's.
        fused_adam = fused is not None and device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=lora.learning_rate,
            weight_decay=settings.weight_decay,
            fused=True if fused_adam else None,
        )
        self.total_steps = plan_steps(settings, len(examples))
        self.warmup_steps = math.floor(settings.warmup_ratio * self.total_steps)
        self._batches: Iterator[list[int]] | None = None
        self._next_step: int | None = None

    def memory_request(self) -> fused_path.MemoryRequest:
        """What the fused path must plan for: the largest micro-batch of the whole budget (the batch
        order is fixed by the seed), so the plan holds for every step and every resumed job."""
        settings = self.settings
        upcoming = micro_batches(len(self.examples), settings.batch_size, self.seed)
        most_tokens = max(
            sum(len(self.examples[i].input_ids) for i in next(upcoming))
            for _ in range(self.total_steps * settings.gradient_accumulation)
        )
        return fused_path.MemoryRequest(
            tokens_per_micro_batch=most_tokens,
            dropout=self.lora.lora_dropout,
            checkpointing=settings.gradient_checkpointing,
            dequant_cache=settings.dequant_cache,
            budget_gib=settings.memory_budget_gib,
            device=self.device,
            trainable_params=sum(p.numel() for p in self.parameters),
        )

    def state_dict(self) -> dict[str, Any]:
        weights = {name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
        return {"lora": weights, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])

    def _micro_batches(self, step: int) -> list[list[TokenizedExample]]:
        accumulation = self.settings.gradient_accumulation
        if self._next_step != step:
            self._batches = micro_batches(len(self.examples), self.settings.batch_size, self.seed, step * accumulation)
        self._next_step = step + 1
        return [[self.examples[i] for i in next(self._batches)] for _ in range(accumulation)]

    def _forward_backward(self, micro: list[list[TokenizedExample]], loss_tokens: int) -> torch.Tensor:
        summed = torch.zeros((), device=self.device)
        for batch_examples in micro:
            loss = micro_batch_loss(
                self.model,
                self.fused,
                batch_examples,
                pad_id=self.pad_id,
                device=self.device,
                dtype=self.dtype,
                training=True,
            )
            (loss / loss_tokens).backward()
            summed += loss.detach()
        return summed

    def step(self, step: int, progress: Progress, *, check_gradients: bool = False) -> tuple[float, float]:
        """Optimizer step ``step`` (0-based), recorded into ``progress``; returns its loss and learning rate.

        ``check_gradients``: fail unless every LoRA weight got a gradient (the first step of a job,
        and the first after an evaluation, where the CPU 4-bit trap would show).
        """
        started = time.perf_counter()
        learning_rate = self.lora.learning_rate * learning_rate_factor(
            step, self.total_steps, self.warmup_steps, self.settings.scheduler
        )
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        micro = self._micro_batches(step)
        loss_tokens = sum(example.loss_tokens for batch in micro for example in batch)
        try:
            summed_loss = self._forward_backward(micro, loss_tokens)
        except Exception as error:
            if not fell_back_to_eager(self.fused, error):
                raise
            self.optimizer.zero_grad(set_to_none=True)  # the same step again, with eager kernels
            summed_loss = self._forward_backward(micro, loss_tokens)
        if check_gradients:
            require_lora_gradients(self.model)
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The step's one host sync, after the update is queued: the host's work for clipping and
        # AdamW then overlaps the GPU's backward instead of leaving the GPU idle after it. A
        # diverged step's update is thrown away with the trial (its state and adapter are removed).
        step_loss = summed_loss.item() / loss_tokens
        if not math.isfinite(step_loss):
            raise LossDiverged(f"loss became {'NaN' if math.isnan(step_loss) else 'inf'} at step {step + 1}")
        progress.loss_curve.append(step_loss)
        progress.train_tokens += sum(len(example.input_ids) for batch in micro for example in batch)
        progress.train_time += time.perf_counter() - started
        return step_loss, learning_rate


def progress_bar(total: int, initial: int) -> tqdm:
    """A live bar on a terminal; none when stderr is a file (a job's log), where its carriage-return
    redraws would fill the log with what the periodic step lines already say."""
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        file=sys.stderr,
        ncols=100,
        disable=not sys.stderr.isatty(),
    )


def train(
    trainer: Trainer, progress: Progress, *, until_step: int | None = None, deadline: float | None = None
) -> None:
    """Train from step ``progress.steps`` up to ``until_step`` (None: the full budget), in place.

    ``deadline`` (a ``time.time()`` value) stops the loop with ``TimeLimitReached`` once passed.
    """
    total = trainer.total_steps
    stop = total if until_step is None else min(until_step, total)
    first = progress.steps
    require_trainable_4bit_weights(trainer.model)
    trainer.model.train()
    with progress_bar(total, first) as bar:
        for step in range(first, stop):
            if deadline is not None and time.time() > deadline:
                raise TimeLimitReached(f"stopped after {step} of {total} steps at the job's time limit")
            step_loss, learning_rate = trainer.step(step, progress, check_gradients=step == first)
            tokens_per_second = progress.train_tokens / progress.train_time
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
            bar.update()
            if (step + 1) % trainer.settings.log_every == 0 or step + 1 == stop:
                bar.write(
                    f"step {step + 1}/{total} loss {step_loss:.4f} lr {learning_rate:.3g} {tokens_per_second:.0f} tok/s",
                    file=sys.stderr,
                )


def save_adapter(model, target: Path, step: int) -> None:
    """Save the LoRA adapter of training step ``step`` to ``target`` through a scratch folder, so it
    is complete or absent; an adapter already there is moved aside first and removed after. The
    step goes beside it (``ADAPTER_STEP_FILE``): a record that selected another step (a rung's,
    after the trial trained on) can tell that this adapter is not its own."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    scratch, previous = target.parent / f".{target.name}.{tag}.tmp", target.parent / f".{target.name}.{tag}.old"
    try:
        model.save_pretrained(scratch)
        atomic_write_json(scratch / ADAPTER_STEP_FILE, {"step": step})
        if target.exists():
            target.rename(previous)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


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


@dataclass
class Trial:
    """One trial's inputs, resolved and checked: what ``prepare`` knows before any model loads."""

    lora: LoraHyperparameters
    settings: TrainingSettings
    seed: int
    model_path: str
    revision: str | None
    trust_remote_code: bool
    output_dir: Path
    data: PreparedData
    device: torch.device
    dtype: torch.dtype
    use_fused: bool
    checkpointing: bool
    pad_id: int
    train_set: list[TokenizedExample]
    eval_set: list[TokenizedExample]
    total_steps: int
    stop_step: int  # where this job stops: until_step, or the full budget
    identity: dict[str, Any]  # what a saved state must match (loratune.training.state)
    state: dict[str, Any] | None  # the state saved by an earlier job of this trial


def prepare(
    hparams: Mapping[str, Any],
    settings: TrainingSettings | Mapping[str, Any],
    model_path: str,
    data_dir: str | Path,
    output_dir: str | Path,
    seed: int,
    *,
    revision: str | None,
    trust_remote_code: bool,
    until_step: int | None,
) -> Trial:
    """Resolve the trial's settings, device and data, and read its saved state; raises on bad input."""
    if not isinstance(settings, TrainingSettings):
        settings = TrainingSettings(**settings)
    lora, settings = resolve_trial(hparams, settings)
    if until_step is not None and (isinstance(until_step, bool) or not isinstance(until_step, int) or until_step < 1):
        raise ValueError(f"until_step: expected a step >= 1 or None, got {until_step!r}")
    data = read_prepared(data_dir)
    device = resolve_device(settings.device)
    tokenizer = load_tokenizer(model_path, revision=revision, trust_remote_code=trust_remote_code)
    train_set = [e for e in tokenize_examples(tokenizer, data.train, settings.max_seq_length, data.template) if e.loss_tokens]
    eval_set = [e for e in tokenize_examples(tokenizer, data.eval, settings.max_seq_length, data.template) if e.loss_tokens]
    if not train_set:
        raise ValueError(
            f"training.max_seq_length: {settings.max_seq_length} tokens leave no completion token "
            f"in any of the {len(data.train)} training examples"
        )
    total_steps = plan_steps(settings, len(train_set))
    identity = saved.trial_identity(lora, settings, seed)
    return Trial(
        lora=lora,
        settings=settings,
        seed=seed,
        model_path=model_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        output_dir=Path(output_dir),
        data=data,
        device=device,
        dtype=resolve_compute_dtype(settings.compute_dtype, device),
        use_fused=choose_fused(settings, model_path, revision=revision, trust_remote_code=trust_remote_code),
        checkpointing=(
            device.type == "cuda" if settings.gradient_checkpointing == "auto" else settings.gradient_checkpointing
        ),
        pad_id=tokenizer.pad_token_id,
        train_set=train_set,
        eval_set=eval_set,
        total_steps=total_steps,
        stop_step=total_steps if until_step is None else min(until_step, total_steps),
        identity=identity,
        state=saved.read_state(output_dir, identity),
    )


def start_record(trial: Trial, started_at: str) -> TrialMetrics:
    """The metrics known before training: what was asked for, on what, from which data."""
    settings, data = trial.settings, trial.data
    return TrialMetrics(
        eval_tokens=sum(e.loss_tokens for e in trial.eval_set),
        max_steps=trial.total_steps,
        n_train_examples=len(trial.train_set),
        n_eval_examples=len(trial.eval_set),
        device=trial.device.type,
        gpu_name=torch.cuda.get_device_name(trial.device) if trial.device.type == "cuda" else None,
        quantization=settings.quantization,
        compute_dtype=str(trial.dtype).removeprefix("torch."),
        gradient_checkpointing=trial.checkpointing if not trial.use_fused else settings.gradient_checkpointing,
        fused_kernels=trial.use_fused,
        started_at=trial.state["progress"]["segments"][0]["started_at"] if trial.state else started_at,
        hparams=asdict(trial.lora),
        settings=asdict(settings),
        provenance={
            **model_fingerprint(trial.model_path),
            "dataset_sha256": data.manifest.get("data_sha256"),
            "dataset_source_sha256": data.manifest.get("source_sha256"),
            "libraries": _library_versions(),
            "seed": trial.seed,
            "hostname": socket.gethostname(),
        },
    )


def setup(trial: Trial, metrics: TrialMetrics, base_models: BaseModels | None = None) -> Trainer:
    """Load the base model (or take it from ``base_models``, loaded by an earlier trial of this
    process), add fresh LoRA adapters, plan the fused path's memory, build the optimizer, and
    continue from the trial's saved state if it has one."""
    from transformers import set_seed
    from transformers.utils import logging as transformers_logging

    settings = trial.settings
    if not sys.stderr.isatty():  # a job's log: no "Loading weights" redraws either (see progress_bar)
        transformers_logging.disable_progress_bar()
    set_seed(trial.seed)  # loading draws no random numbers, so a reused base gives the same adapters
    model = (base_models.load if base_models is not None else load_base_model)(
        trial.model_path,
        quantization=settings.quantization,
        dtype=trial.dtype,
        device=trial.device,
        gradient_checkpointing=trial.checkpointing,
        fused=trial.use_fused,
        revision=trial.revision,
        trust_remote_code=trial.trust_remote_code,
    )
    model = add_lora(
        model,
        rank=trial.lora.lora_rank,
        alpha=trial.lora.lora_alpha,
        dropout=trial.lora.lora_dropout,
        target_modules=settings.target_modules,
    )
    metrics.trainable_params, metrics.total_params = model.get_nb_trainable_parameters()
    fused = None
    if trial.use_fused:
        fused = fused_path.FusedCausalLM(model, compile=resolve_compile(settings, trial.device))
    trainer = Trainer(
        model,
        trial.train_set,
        settings,
        trial.lora,
        pad_id=trial.pad_id,
        device=trial.device,
        dtype=trial.dtype,
        seed=trial.seed,
        fused=fused,
    )
    if fused is not None:
        plan = fused.fit_memory(trainer.memory_request())
        log.info("fused path: %s%s", plan.describe(len(fused.layers)), ", compiled kernels" if fused.compiled else "")
    if trial.state is not None:
        trainer.load_state_dict(trial.state["training"])
        saved.restore_rng(trial.state["rng"])
        log.info("continuing from the state saved at step %d", len(trial.state["progress"]["loss_curve"]))
    return trainer


def train_and_evaluate(
    trial: Trial, trainer: Trainer, progress: Progress, *, deadline: float | None, segment: dict[str, Any]
) -> None:
    """Train up to ``trial.stop_step``, evaluating at each evaluation step on the way and at the
    stop; after each evaluation, keep the adapter if it is the one ``select`` keeps, and save the
    state unless the budget is done. Out of time, save the state where training stopped."""
    settings = trial.settings
    stops = [
        s for s in evaluation_steps(trial.total_steps, settings.eval_every) if progress.steps < s < trial.stop_step
    ]
    if progress.steps < trial.stop_step:
        stops.append(trial.stop_step)
    for stop in stops:
        try:
            train(trainer, progress, until_step=stop, deadline=deadline)
        except TimeLimitReached:
            if progress.steps > 0:
                save_trial_state(trial, trainer, progress, segment)
            raise
        eval_loss = None
        if trial.eval_set:
            eval_loss = evaluate(
                trainer.model,
                trial.eval_set,
                settings.eval_batch_size,
                pad_id=trial.pad_id,
                device=trial.device,
                dtype=trial.dtype,
                fused=trainer.fused,
            )
        point = {
            "step": stop,
            "eval_loss": eval_loss,
            "train_loss": sum(progress.loss_curve) / progress.steps,
            "train_time": progress.train_time,
        }
        progress.curve.append(point)
        log.info(
            "step %d/%d: held-out loss %s", stop, trial.total_steps, "-" if eval_loss is None else f"{eval_loss:.4f}"
        )
        if settings.keep_adapter and progress.selected(settings.select) is point:
            save_adapter(trainer.model, trial.output_dir / "adapter", stop)
        if stop < trial.total_steps:
            save_trial_state(trial, trainer, progress, segment)
    if progress.steps >= trial.total_steps:
        saved.remove_state(trial.output_dir)


def save_trial_state(trial: Trial, trainer: Trainer, progress: Progress, segment: dict[str, Any]) -> None:
    """Save the state with this job counted as a finished segment, as a later job will see it."""
    done = {**asdict(progress), "segments": progress.segments + [close_segment(segment, progress)]}
    saved.save_state(trial.output_dir, identity=trial.identity, training=trainer.state_dict(), progress=done)


def open_segment(progress: Progress, started_at: str, clock: float) -> dict[str, Any]:
    """This job's share of the trial, from its start (``clock``, a ``time.perf_counter()``) and
    ``progress`` as the job found it; ``close_segment`` measures it."""
    return {
        "started_at": started_at,
        "from_step": progress.steps,
        "train_time_before": progress.train_time,
        "clock": clock,
    }


def close_segment(segment: dict[str, Any], progress: Progress) -> dict[str, Any]:
    return {
        "started_at": segment["started_at"],
        "from_step": segment["from_step"],
        "to_step": progress.steps,
        "train_time": progress.train_time - segment["train_time_before"],
        "job_time": time.perf_counter() - segment["clock"],
    }


def record(trial: Trial, metrics: TrialMetrics, progress: Progress, segment: dict[str, Any]) -> dict[str, Any]:
    """Fill in what training measured; the objective values come from the step ``select`` picks."""
    segments = progress.segments + [close_segment(segment, progress)]
    metrics.steps = progress.steps
    metrics.loss_curve = list(progress.loss_curve)
    metrics.curve = [dict(point) for point in progress.curve]
    metrics.segments = segments
    metrics.train_tokens = progress.train_tokens
    metrics.total_train_time = progress.train_time
    metrics.job_time = sum(s["job_time"] for s in segments)
    metrics.peak_memory_gib = peak_memory_gib(trial.device)
    chosen = progress.selected(trial.settings.select)
    if metrics.status == "ok" and chosen is not None:
        upto = progress.loss_curve[: chosen["step"]]
        tail = max(1, math.ceil(0.1 * len(upto)))
        metrics.best_step = chosen["step"]
        metrics.eval_loss = chosen["eval_loss"]
        metrics.train_loss = chosen["train_loss"]
        metrics.final_train_loss = sum(upto[-tail:]) / tail
        metrics.train_time = chosen["train_time"]
        metrics.tokens_per_second = progress.train_tokens / progress.train_time
    return metrics.as_dict()


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
    until_step: int | None = None,
    base_models: BaseModels | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` with LoRA ``hparams`` on the data in ``data_dir``; return the metrics
    (the fields of ``TrialMetrics``).

    The trial continues from its state in ``output_dir``/state if an earlier job saved one, and
    trains up to ``until_step`` (None: the full budget; the LR schedule always spans the full
    budget, so a trial stopped there is a prefix of the full run). ``deadline`` (a ``time.time()``
    value, e.g. a Slurm job's end minus a margin) stops training when passed; the trial is then
    recorded as failed, with its state saved, rather than killed unrecorded.

    ``hparams`` holds ``lora_rank``, ``lora_alpha``, ``learning_rate`` and optionally
    ``lora_dropout``; a key named like a training setting overrides it for this trial. The
    adapter goes to ``output_dir``/adapter when ``settings.keep_adapter``. ``revision`` and
    ``trust_remote_code`` apply to a hub model. ``base_models``: a process's cache of the loaded
    base model, shared by the trials it trains one after another (a failed trial drops it). Raises
    on bad settings, data or saved state; a failure of the training itself comes back as
    ``status: failed``.
    """
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    trial = prepare(
        hparams,
        settings,
        model_path,
        data_dir,
        output_dir,
        seed,
        revision=revision,
        trust_remote_code=trust_remote_code,
        until_step=until_step,
    )
    metrics = start_record(trial, started_at)
    progress = Progress(**trial.state["progress"]) if trial.state else Progress()
    segment = open_segment(progress, started_at, clock)
    log.info(
        "trial: %s on %s (%s, %s), %d train / %d eval examples, steps %d to %d of %d",
        metrics.hparams,
        trial.device,
        trial.settings.quantization,
        metrics.compute_dtype,
        len(trial.train_set),
        len(trial.eval_set),
        progress.steps,
        trial.stop_step,
        trial.total_steps,
    )
    trainer = None
    if trial.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trial.device)
    try:
        trainer = setup(trial, metrics, base_models)
        train_and_evaluate(trial, trainer, progress, deadline=deadline, segment=segment)
        if trainer.fused is not None:
            metrics.gradient_checkpointing = len(trainer.fused.plan.checkpointed) > 0
            metrics.memory_plan = describe_plan(trainer.fused)
        metrics.status = "ok"
    except Exception as error:  # the trial failed; the study goes on (see the module docstring)
        log.error("trial failed:\n%s", traceback.format_exc())
        metrics.status, metrics.error = "failed", _one_line(error)
        if isinstance(error, LossDiverged):
            # Continued exactly, it would diverge at the same step: nothing to go on from, and no
            # adapter of a failed trial to mistake for a result. Other failures (the time limit,
            # memory, a node) keep both, so a job submitted again continues.
            saved.remove_state(trial.output_dir)
            shutil.rmtree(trial.output_dir / "adapter", ignore_errors=True)
    finally:
        if base_models is not None:
            if metrics.status == "ok":
                base_models.give_back(trainer.model)
            else:
                base_models.forget()
        del trainer
        gc.collect()
        if trial.device.type == "cuda":
            torch.cuda.empty_cache()
    return record(trial, metrics, progress, segment)


def describe_plan(fused: fused_path.FusedCausalLM) -> dict[str, Any]:
    plan = fused.plan
    return {
        "checkpointed_layers": len(plan.checkpointed),
        "layers": len(fused.layers),
        "offload": plan.offload,
        "loss_chunk": plan.loss_chunk,
        "embed_on_host": plan.embed_on_host,
        "chunked_backward": plan.chunked_backward,
        "dequant_cache": plan.dequant_cache,
        "cached_layers": len(plan.cached_layer_indices(len(fused.layers))),
        "budget_gib": plan.budget_gib,
        "estimate_gib": plan.estimate_gib,
        "compiled": fused.compiled,
    }
