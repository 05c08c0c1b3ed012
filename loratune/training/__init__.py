"""The qlora backend: base models, fine-tuning data, and one LoRA/QLoRA training trial.

``prepare_model`` and ``prepare_dataset`` run once per study; ``run_trial`` once per trial.
torch and transformers are imported on first use of a trial, not by ``import loratune.training``.
"""

from loratune.training.data import prepare_dataset
from loratune.training.models import prepare_model
from loratune.training.settings import DatasetSpec, LoraHyperparameters, ModelSpec, TrainingSettings

__all__ = [
    "DatasetSpec",
    "LoraHyperparameters",
    "ModelSpec",
    "TrainingSettings",
    "prepare_dataset",
    "prepare_model",
    "run_trial",
]


def __getattr__(name):
    # The trainer imports torch (seconds); config validation and dataset preparation need not.
    if name == "run_trial":
        from loratune.training.trainer import run_trial

        return run_trial
    raise AttributeError(name)
