"""The qlora backend: base models, fine-tuning data, and one LoRA/QLoRA training trial.

``prepare_model`` and ``prepare_dataset`` run once per study; ``run_trial`` once per trial.
They load on first use: ``import loratune.training`` (the config check does it on every
Snakemake start) reads only the settings and the metrics record, not torch or pandas.
"""

from importlib import import_module

from loratune.training.metrics import TrialMetrics
from loratune.training.settings import DatasetSpec, LoraHyperparameters, ModelSpec, TrainingSettings

__all__ = [
    "DatasetSpec",
    "LoraHyperparameters",
    "ModelSpec",
    "TrainingSettings",
    "TrialMetrics",
    "prepare_dataset",
    "prepare_model",
    "run_trial",
]

# name -> the module that defines it (the trainer imports torch: seconds; data imports pandas)
_LAZY = {
    "prepare_dataset": "loratune.training.data",
    "prepare_model": "loratune.training.models",
    "run_trial": "loratune.training.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
