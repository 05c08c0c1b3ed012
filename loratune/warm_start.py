"""Warm start: earlier results that a study starts from instead of starting cold.

A study's ``warm_start`` lists earlier results: a loratune study's ``trials.tsv`` or a GPTune
JSON history database (GPTune 2.0.0's ``HistoryDB`` layout, ours from ``export_gptune_db``
included). Each source is one of two kinds:

- **same setting** (model, dataset and training settings as this study's): its trials are
  observations of this study. The pilot writes their ``metrics.json`` from the source instead
  of training them (so they are never retrained), they join the pilot's history and
  ``trials.tsv`` with a ``source`` column, and, being in every history, they are never
  proposed again. The pilot trains ``pilot.n`` minus the matching observations (at least 0).
- **related task** (another model, dataset or training): the model-based proposers fit them
  as a related task (``transfer_history``); they are never trials of this study.

A loratune source is of the same setting when the ``config.resolved.yaml`` next to its
``trials.tsv`` has the same ``setting_fingerprint`` (backend, benchmark, model, dataset and
training sections) as this study; a GPTune file carries no such record, so it is a related
task unless its entry says ``same_setting: true`` (an entry may also force ``false``).

A source with several seeds gives a study seed its own seed's rows when it has them, else
all of its rows; a point measured twice is kept once (its first row).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import yaml

from loratune import ledger
from loratune.proposers.base import RELATED_COLUMN
from loratune.space import ChoiceParam, SearchSpace

__all__ = [
    "FADE_AFTER",
    "FORMATS",
    "RELATED",
    "SAME",
    "SETTING_FIELDS",
    "TRANSFER",
    "TRANSFERS",
    "WarmSource",
    "WarmStartError",
    "load_sources",
    "observations",
    "pilot_size",
    "related_rows",
    "setting_fingerprint",
    "transfer_history",
]

FORMATS = ("loratune", "gptune")
SAME, RELATED = "same_setting", "related_task"
# The config sections whose equality makes two studies' trials interchangeable: what a trial's
# result depends on besides its hyperparameters (study_state.TRIAL_FIELDS without search_space,
# which only bounds where the trials lie).
SETTING_FIELDS = ("backend", "benchmark", "model", "dataset", "training")
# How the model-based proposers use a related task's rows: "observations" fits them as they
# are; "standardized" first maps each objective of the related rows to the mean and standard
# deviation of this study's own ok rows (with two or more), so that a shift between tasks (another
# dataset's loss level) does not pass for a result here; "robust" maps them by median and
# interquartile range instead (a few diverged runs, losses of 10 among losses of 3, set a mean
# and a standard deviation but not a median and quartiles); "fading" is "standardized" until this
# study has FADE_AFTER ok trials of its own and drops the related rows from then on, so that late
# rounds follow this task alone; "aligned" is "standardized" except for an objective that both
# tasks measure alike, i.e. whose every own ok value also occurs among the related rows' values
# (the adapter's parameter count on the same model): that one stays as measured, since moving it
# would give one rank two parameter counts. TRANSFER is the one bench/warm_start.py measured to be
# best: over 10 seeds, in both directions between the two measured tables, "aligned" reaches the
# cold start's 16-trial hypervolume within 6 trials (median 6 and 4.5) and its median is never
# below the cold start's; "standardized" needs 8 on one direction and dips below it there,
# "robust" and "fading" lost to it (bench/results/warm_start_bfe42eb.md, warm_start_6a7b276.md).
TRANSFERS = ("observations", "standardized", "robust", "fading", "aligned")
FADE_AFTER = 6
TRANSFER = "aligned"
# The study-state record next to a study's trials.tsv (study_state.RESOLVED_CONFIG).
_RESOLVED = "config.resolved.yaml"


class WarmStartError(ValueError):
    """A warm-start source that cannot be used; the message starts with ``warm_start[i].path``."""


@dataclass(frozen=True)
class WarmSource:
    """One readable source: its rows inside the space (params, objectives, status, source columns)."""

    path: str
    kind: str  # SAME or RELATED
    rows: pd.DataFrame


def setting_fingerprint(config: Mapping[str, Any]) -> str:
    """A digest of the config sections that decide a trial's result (``SETTING_FIELDS``)."""
    setting = {name: config.get(name) for name in SETTING_FIELDS}
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()


def _read_loratune(path: Path, where: str) -> pd.DataFrame:
    try:
        table = ledger.read_table(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise WarmStartError(f"{where}: unreadable ({str(error).removeprefix(f'{path}: ')})") from None
    missing = [c for c in ("trial_id", "status") if c not in table.columns]
    if missing:
        raise WarmStartError(f"{where}: not a loratune trials.tsv (no column(s) {missing})")
    return table.rename(columns={"seed": "source_seed", "trial_id": "source_trial_id"})


def _read_gptune(path: Path, where: str) -> pd.DataFrame:
    try:
        database = json.loads(path.read_text(encoding="utf-8"))
        table = ledger.from_gptune_db(database)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise WarmStartError(f"{where}: unreadable as a GPTune database ({error})") from None
    renames = {"seed": "source_seed", "trial_id": "source_trial_id"}
    return table.rename(columns={k: v for k, v in renames.items() if k in table.columns})


def _inside(space: SearchSpace, table: pd.DataFrame) -> np.ndarray:
    """Rows whose every tunable value lies in the space's range (a choice: one of its values)."""
    inside = np.ones(len(table), dtype=bool)
    for param in space.tunable:
        values = table[param.name]
        if isinstance(param, ChoiceParam):
            allowed = {str(v) for v in param.values}
            inside &= values.astype(str).isin(allowed).to_numpy() | values.isin(param.values).to_numpy()
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            inside &= (numbers >= param.low) & (numbers <= param.high)
    return inside


def _same_setting(entry: Mapping[str, Any], path: Path, config: Mapping[str, Any]) -> bool:
    if entry.get("same_setting") is not None:
        return bool(entry["same_setting"])
    if entry.get("format", "loratune") == "gptune":
        return False
    resolved = path.parent / _RESOLVED
    if not resolved.is_file():
        return False
    earlier = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    return setting_fingerprint(earlier) == setting_fingerprint(config)


def load_sources(config: Mapping[str, Any], space: SearchSpace, objectives: Mapping[str, str]) -> list[WarmSource]:
    """Every ``warm_start`` entry of a (validated) config, read and restricted to the space.

    Raises ``WarmStartError`` naming ``warm_start[i].path`` for a missing or unreadable file,
    a source lacking a search-space parameter or an objective, or one with no trial inside the
    space. Relative paths are taken from the working directory (the workflow's).
    """
    sources = []
    for index, entry in enumerate(config.get("warm_start") or []):
        where = f"warm_start[{index}].path: {entry['path']}"
        path = Path(entry["path"])
        if not path.is_file():
            raise WarmStartError(f"{where}: no such file")
        reader = _read_gptune if entry.get("format", "loratune") == "gptune" else _read_loratune
        table = reader(path, where)
        missing = [c for c in space.tunable_names if c not in table.columns]
        if missing:
            raise WarmStartError(f"{where}: lacks the search-space parameter(s) {missing}")
        missing = [c for c in objectives if c not in table.columns]
        if missing:
            raise WarmStartError(f"{where}: lacks the objective(s) {missing}; it has {list(table.columns)}")
        table = table[_inside(space, table)]
        if table.empty:
            raise WarmStartError(f"{where}: no trial inside the search space")
        if "status" not in table.columns:
            table = table.assign(status="ok")
        kind = SAME if _same_setting(entry, path, config) else RELATED
        sources.append(WarmSource(str(entry["path"]), kind, table.reset_index(drop=True)))
    return sources


def _for_seed(space: SearchSpace, sources: list[WarmSource], kind: str, seed: int) -> pd.DataFrame:
    """The rows of every source of ``kind`` for study seed ``seed``, snapped, one per point."""
    parts = []
    for source in sources:
        if source.kind != kind:
            continue
        rows = source.rows
        if "source_seed" in rows.columns and (rows["source_seed"] == seed).any():
            rows = rows[rows["source_seed"] == seed]
        parts.append(rows.assign(source=source.path))
    if not parts:
        return pd.DataFrame(columns=[*space.names, "status", "source"])
    rows = pd.concat(parts, ignore_index=True)
    points = [space.snap(p) for p in rows[space.tunable_names].to_dict("records")]
    snapped = pd.DataFrame(points, index=rows.index)
    rows = rows.assign(**{name: snapped[name] for name in space.names})
    keys = pd.Series([space.key(p) for p in points], index=rows.index)
    return rows[~keys.duplicated()].reset_index(drop=True)


def observations(config, space: SearchSpace, objectives: Mapping[str, str], seed: int) -> list[dict]:
    """The same-setting trials of study seed ``seed`` as metrics records (what a trial's
    ``metrics.json`` holds): the source row's scalar values, ``trial_id`` in this study,
    ``source`` (the file), ``source_trial_id`` and ``warm_start: same_setting``."""
    rows = _for_seed(space, load_sources(config, space, objectives), SAME, seed)
    records = []
    for row in rows.to_dict("records"):
        point = {name: row[name] for name in space.names}
        record = {k: v for k, v in row.items() if k not in (*ledger.ID_COLUMNS, *space.names) and not _missing(v)}
        records.append({**record, "trial_id": space.trial_id(point), "warm_start": SAME, **point})
    return records


def related_rows(config, space: SearchSpace, objectives: Mapping[str, str], seed: int) -> pd.DataFrame:
    """The related-task rows of study seed ``seed``: parameters, objectives, status, source."""
    rows = _for_seed(space, load_sources(config, space, objectives), RELATED, seed)
    return rows.reindex(columns=[*space.names, *objectives, "status", "source"])


def pilot_size(n: int, observed: int) -> int:
    """Pilot trials to train: ``pilot.n`` minus the same-setting observations, at least 0."""
    return max(int(n) - int(observed), 0)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not np.isfinite(value))


def transfer_history(
    space: SearchSpace,
    objectives: Mapping[str, str],
    history: pd.DataFrame | None,
    related: pd.DataFrame | None,
    method: str = TRANSFER,
) -> pd.DataFrame | None:
    """The history a model-based proposer fits: the related rows (see ``TRANSFERS``) before
    this study's own, each row marked in the ``RELATED_COLUMN`` column. A proposer that pools the two
    takes a related point like any fitted one: it looks for better points near it rather than
    measuring it again as it is; one that models the related task as another task (BoTorch's,
    ``Proposer.models_tasks``) may measure it here."""
    if method not in TRANSFERS:
        raise ValueError(f"warm start transfer: must be one of {list(TRANSFERS)}, got {method!r}")
    if related is None or len(related) == 0:
        return history
    related = related[[*space.tunable_names, *objectives, "status"]].copy()
    own = history if history is not None else pd.DataFrame(columns=related.columns)
    if method == "fading" and min(len(_ok_values(own, n)) if n in own.columns else 0 for n in objectives) >= FADE_AFTER:
        return history  # this study's own trials are enough now
    if method in ("standardized", "fading", "robust", "aligned"):
        related = _match_scale(related, own, objectives, robust=method == "robust", keep_shared=method == "aligned")
    if history is not None and len(history):
        taken = {space.key(space.snap(p)) for p in own[space.tunable_names].to_dict("records")}
        keys = [space.key(space.snap(p)) for p in related[space.tunable_names].to_dict("records")]
        related = related[[key not in taken for key in keys]]
    marked = [related.assign(**{RELATED_COLUMN: True}), own.assign(**{RELATED_COLUMN: False})]
    return pd.concat(marked, ignore_index=True)


def _ok_values(table: pd.DataFrame, name: str) -> pd.Series:
    values = pd.to_numeric(table[name], errors="coerce")
    ok = np.isfinite(values.to_numpy(dtype=float))
    if "status" in table.columns:
        ok &= (table["status"].astype(str) == "ok").to_numpy()
    return values[ok]


def _match_scale(
    related: pd.DataFrame,
    own: pd.DataFrame,
    objectives: Mapping[str, str],
    robust: bool = False,
    keep_shared: bool = False,
) -> pd.DataFrame:
    """Each objective of ``related`` moved to the centre and spread of ``own``'s ok values (mean
    and standard deviation; ``robust``: median and interquartile range); an objective with fewer
    than two own values, or a constant one, stays as it is, and so, with ``keep_shared``, does
    one whose own values all occur among the related ones."""
    related = related.copy()
    for name in objectives:
        theirs, mine = _ok_values(related, name), _ok_values(own, name) if name in own.columns else pd.Series()
        if len(mine) < 2 or len(theirs) < 2:
            continue
        if keep_shared and mine.isin(set(theirs)).all():
            continue
        their_centre, their_spread = _centre_spread(theirs, robust)
        my_centre, my_spread = _centre_spread(mine, robust)
        if their_spread == 0 or my_spread == 0:
            continue
        values = pd.to_numeric(related[name], errors="coerce")
        related[name] = (values - their_centre) / their_spread * my_spread + my_centre
    return related


def _centre_spread(values: pd.Series, robust: bool) -> tuple[float, float]:
    if robust:
        return float(values.median()), float(values.quantile(0.75) - values.quantile(0.25))
    return float(values.mean()), float(values.std())
