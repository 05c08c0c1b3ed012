"""Which hyperparameter matters: per objective, the fANOVA importance of every tuned parameter.

fANOVA (Hutter et al. 2014, through ``optuna.importance``) fits a random forest to the trials
and splits the variance of its prediction over the parameters: a parameter's importance is the
share of the variance its main effect explains, normalized to sum to 1 per objective. The
trials become an in-memory Optuna study whose distributions come from the search space, so a
choice is its ordinal index (the way every proposer searches it) and a log-scaled parameter
is weighed on its log scale.

On LoRA grids the held-out loss follows the size of the adapter's update, learning rate x
alpha / rank, more than any one of the three: when the space has all three, a second fit adds
the derived ``UPDATE_SCALE`` = log(lr * alpha / rank) as one more input, and its share shows
how much of the three parameters' effect that one number carries.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from loratune.ledger import require_columns
from loratune.space import ChoiceParam, FixedParam, FloatParam, IntParam, SearchSpace

__all__ = ["UPDATE_SCALE", "IMPORTANCE_COLUMNS", "update_scale", "importance_table"]

UPDATE_SCALE = "log(lr*alpha/rank)"
SCALE_PARAMS = ("learning_rate", "lora_alpha", "lora_rank")
IMPORTANCE_COLUMNS = ["objective", "parameter", "importance", "rank", "importance_with_update_scale", "n_trials"]
# fANOVA's forest is random; a fixed seed makes the table reproducible. Fewer trials than this
# cannot split variance over several parameters: the table then says NaN.
FANOVA_SEED = 0
MIN_TRIALS = 3


def _distribution(param, values: pd.Series):
    """The Optuna distribution of ``param`` and the trials' values on it."""
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(param, ChoiceParam):
        return IntDistribution(0, len(param.values) - 1), values.map(param.index).astype(int)
    if isinstance(param, IntParam):
        # Optuna allows a step only on a linear scale; the trials' values lie on the step anyway.
        step = 1 if param.log else param.step
        return IntDistribution(param.low, param.high, log=param.log, step=step), values.astype(int)
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log), values.astype(float)
    raise TypeError(f"importance: parameter {param.name!r} is not tunable")


def _numeric_bounds(param) -> tuple[float, float]:
    if isinstance(param, FixedParam):
        return float(param.value), float(param.value)
    if isinstance(param, ChoiceParam):
        return float(min(param.values)), float(max(param.values))
    return float(param.low), float(param.high)


def update_scale(space: SearchSpace, trials: pd.DataFrame) -> tuple[pd.Series, tuple[float, float]] | None:
    """log(lr * alpha / rank) of every trial and its range over the space, or None when the
    space lacks one of the three parameters (or one is not a number)."""
    if not all(name in space.names for name in SCALE_PARAMS):
        return None
    params = {name: space[name] for name in SCALE_PARAMS}
    if any(
        isinstance(p, ChoiceParam) and not all(isinstance(v, (int, float)) for v in p.values) for p in params.values()
    ):
        return None
    if all(isinstance(p, FixedParam) for p in params.values()):
        return None
    (lr_low, lr_high), (alpha_low, alpha_high), (rank_low, rank_high) = (_numeric_bounds(p) for p in params.values())
    values = {
        name: (pd.to_numeric(trials[name]) if name in trials.columns else pd.Series(space.fixed[name], trials.index))
        for name in SCALE_PARAMS
    }
    scale = np.log(values["learning_rate"] * values["lora_alpha"] / values["lora_rank"])
    bounds = (math.log(lr_low * alpha_low / rank_high), math.log(lr_high * alpha_high / rank_low))
    return scale.astype(float), bounds


def _fanova(inputs: Mapping[str, tuple[Any, pd.Series]], values: np.ndarray, sense: str) -> dict[str, float]:
    """fANOVA importances of ``inputs`` (name -> (distribution, trial values)) for ``values``."""
    import optuna

    study = optuna.create_study(direction="minimize" if sense == "min" else "maximize")
    names = list(inputs)
    distributions = {name: inputs[name][0] for name in names}
    study.add_trials(
        optuna.trial.create_trial(
            params={name: inputs[name][1].iloc[i].item() for name in names},
            distributions=distributions,
            value=float(values[i]),
        )
        for i in range(len(values))
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=FANOVA_SEED)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, params=names)


def importance_table(trials: pd.DataFrame, space: SearchSpace, objectives: Mapping[str, str]) -> pd.DataFrame:
    """Per objective and tuned parameter: ``importance`` (fANOVA over the tuned parameters,
    summing to 1), its ``rank`` (1 = most important), ``importance_with_update_scale`` (the fit
    that adds ``UPDATE_SCALE``, which gets a row of its own; NaN without lr, alpha and rank) and
    ``n_trials``, the trials fitted: the ok ones with a finite value (stopped trials were
    measured after fewer steps, failed ones not at all; a trial two arms share counts once).
    """
    import optuna

    require_columns(
        trials, ["seed", "trial_id", "status", *space.tunable_names, *objectives], "importance's trials table"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    unique = trials.drop_duplicates(["seed", "trial_id"])
    scale = update_scale(space, unique)
    rows = []
    for objective, sense in objectives.items():
        values = pd.to_numeric(unique[objective], errors="coerce")
        fitted = unique[(unique["status"] == "ok") & np.isfinite(values)]
        y = values[fitted.index].to_numpy(dtype=float)
        inputs = {p.name: _distribution(p, fitted[p.name]) for p in space.tunable}
        enough = len(fitted) >= MIN_TRIALS and np.ptp(y) > 0
        plain = _fanova(inputs, y, sense) if enough else {}
        with_scale = {}
        if scale is not None and enough:
            from optuna.distributions import FloatDistribution

            series, (low, high) = scale
            inputs[UPDATE_SCALE] = (FloatDistribution(low, high), series[fitted.index])
            with_scale = _fanova(inputs, y, sense)
        ordered = sorted(space.tunable_names, key=lambda name: -plain.get(name, 0.0))
        for name in [*space.tunable_names, *([UPDATE_SCALE] if scale is not None else [])]:
            rows.append(
                {
                    "objective": objective,
                    "parameter": name,
                    "importance": plain.get(name, np.nan),
                    "rank": ordered.index(name) + 1 if plain and name in ordered else np.nan,
                    "importance_with_update_scale": with_scale.get(name, np.nan),
                    "n_trials": len(fitted),
                }
            )
    return pd.DataFrame(rows, columns=IMPORTANCE_COLUMNS)
