"""A trial's resumable training state: everything a later job needs to continue it exactly.

One file, ``<output_dir>/state/trial.pt``, written atomically (a scratch file renamed over the
old one), holds the LoRA weights, the optimizer's moments and step counts, the RNG states
(torch, CUDA, Python, numpy) and the progress so far (loss curve, learning curve, tokens,
training seconds, the jobs that trained it). The LR schedule and the data order are functions
of the step and the seed, so the step is their position. A trial stopped at a rung, preempted
or out of time continues from it; one that reached its full budget removes it (the metrics
hold everything, and a state is three times the adapter).
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.training.settings import LoraHyperparameters, TrainingSettings

STATE_FILE = Path("state") / "trial.pt"
# Settings that change how a trial is run or reported, not the model it trains: a state saved
# under other values of these continues all the same.
NEUTRAL_SETTINGS = (
    "log_every",
    "keep_adapter",
    "eval_batch_size",
    "eval_every",
    "select",
    "device",
    "compile",
    "dequant_cache",
    "memory_budget_gib",
    "gradient_checkpointing",
)


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_FILE


def trial_identity(lora: LoraHyperparameters, settings: TrainingSettings, seed: int) -> dict[str, Any]:
    """What a saved state must match to be continued: the hyperparameters, the seed and every
    setting that shapes the training trajectory."""
    shaping = {k: v for k, v in asdict(settings).items() if k not in NEUTRAL_SETTINGS}
    return {"hparams": asdict(lora), "seed": seed, "settings": shaping}


def read_state(output_dir: str | Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of this trial (None: none saved); raises if it belongs to another trial."""
    path = state_path(output_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file: say which file, in one line
        raise ValueError(
            f"{path}: unreadable training state ({type(error).__name__}); remove it to start over"
        ) from None
    saved = state["identity"]
    for section in ("hparams", "settings"):
        for key in sorted(set(saved[section]) | set(identity[section])):
            if saved[section].get(key) != identity[section].get(key):
                raise ValueError(
                    f"{path}: saved by a trial with {section}.{key} = {saved[section].get(key)!r}, not "
                    f"{identity[section].get(key)!r}; remove it to start this trial over"
                )
    if saved["seed"] != identity["seed"]:
        raise ValueError(f"{path}: saved by a trial with seed {saved['seed']}, not {identity['seed']}")
    return state


def save_state(output_dir: str | Path, *, identity: dict[str, Any], training: dict[str, Any], progress: dict) -> None:
    """Write the state atomically: readers see the previous state or this one, never a part."""
    path = state_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    state = {"identity": identity, "training": training, "rng": rng_states(), "progress": progress}
    try:
        torch.save(state, scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def remove_state(output_dir: str | Path) -> None:
    path = state_path(output_dir)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (someone else's file) or already gone
        pass


def rng_states() -> dict[str, Any]:
    """Every random number generator a training step may draw from (dropout masks, mostly)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(position), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
