"""The history ledger: exact table round trips (written atomically), histories, GPTune's JSON format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loratune import files, ledger
from loratune.benchmarks import evaluate
from loratune.designs import pilot_design
from loratune.space import SearchSpace
from conftest import STUDY_SPACE
from test_files import leftovers

OBJECTIVES = {"train_loss": "min", "train_time": "min"}
# Large adapters with a large alpha "run out of memory", so every study has failed trials.
OOM_RANK = 160


def run_trial(space: SearchSpace, seed: int, point: dict, objectives: dict, trials_dir: Path) -> Path:
    """Write a trial's metrics.json the way a trial job records it (benchmark backend)."""
    trial_id = space.trial_id(point)
    record = {"trial_id": trial_id, "seed": seed, **point, "backend": "benchmark",
              "started_at": "2026-11-29T10:00:00+00:00", "finished_at": "2026-11-29T10:00:07+00:00",
              "job_time": 7.25, "hostname": "node01", "slurm_job_id": None,
              "provenance": {"loratune": "0.1.0", "devices": ["cpu"]}}
    if point["lora_rank"] >= OOM_RANK and point["lora_alpha"] >= 64:
        record.update(status="failed", error="OutOfMemoryError: CUDA out of memory.\n\tTried 2 GiB")
        record.update({name: None for name in objectives})
    else:
        record.update(status="ok", error=None)
        record.update(evaluate("zdt1" if len(objectives) == 2 else "dtlz2", space, point, objectives, seed))
    path = trials_dir / f"seed{seed}" / "trials" / trial_id / "metrics.json"
    files.atomic_write_json(path, record)
    return path


def run_round(space, seed, arm, round_, points, objectives, root: Path, previous: Path | None) -> Path:
    """One round as the workflow runs it: proposals.tsv, the trials, then history.tsv."""
    directory = root / f"seed{seed}" / arm / f"round{round_}"
    proposals = pd.DataFrame(
        [{"seed": seed, "arm": arm, "round": round_, "trial_id": space.trial_id(p), **space.snap(p)}
         for p in points],
        columns=["seed", "arm", "round", "trial_id", *space.names],
    )
    ledger.write_table(proposals, directory / "proposals.tsv")
    metrics_paths = [run_trial(space, seed, p, objectives, root) for p in points]
    history = ledger.build_history(
        ledger.read_table(previous) if previous else None,
        ledger.read_table(directory / "proposals.tsv"),
        {Path(p).parent.name: ledger.read_metrics(p) for p in metrics_paths},
    )
    ledger.write_table(history, directory / "history.tsv")
    return directory / "history.tsv"


def make_study(root: Path, seeds=(0,), arms=("gptune", "random"), objectives=OBJECTIVES,
               pilot_n=8, rounds=2, batch=3) -> tuple[SearchSpace, list[Path]]:
    """Pilot + rounds for each arm and seed; returns the final history of every arm and seed.

    The arms' proposals are space-filling designs of their own seed, minus what the history
    holds: real, snapped, distinct points, without depending on the proposers.
    """
    space = SearchSpace.from_config(STUDY_SPACE)
    finals = []
    for seed in seeds:
        pilot = pilot_design(space, pilot_n, "random_sets", seed)
        for arm_index, arm in enumerate(arms):
            history = run_round(space, seed, arm, 0, pilot, objectives, root, None)
            seen = {space.key(p) for p in pilot}
            for round_ in range(1, rounds + 1):
                candidates = pilot_design(space, 30, "lhs", 1000 * seed + 100 * arm_index + round_)
                points = [p for p in candidates if space.key(p) not in seen][:batch]
                seen |= {space.key(p) for p in points}
                history = run_round(space, seed, arm, round_, points, objectives, root, history)
            finals.append(history)
    return space, finals


# ---- tables ----------------------------------------------------------------------------
def test_table_whose_serialization_raises_leaves_the_old_table(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format")

    path = tmp_path / "history.tsv"
    ledger.write_table(pd.DataFrame({"trial_id": ["a"], "x": [1]}), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot format"):
        ledger.write_table(pd.DataFrame({"trial_id": ["b"], "x": [Unprintable()]}), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_table_round_trip_keeps_parameter_types_and_text(tmp_path, study_space):
    space = study_space
    point = space.snap({"lora_rank": 64, "lora_alpha": 16, "learning_rate": 0.000316})
    table = pd.DataFrame([
        {"seed": 0, "arm": "pilot", "round": 0, "trial_id": space.trial_id(point), **point,
         "status": "ok", "error": np.nan, "hostname": "NA", "train_loss": 1 / 3},
        {"seed": 0, "arm": "pilot", "round": 0, "trial_id": "r8_a256_lr1e-05", "lora_rank": 8,
         "lora_alpha": 256, "learning_rate": 1e-05, "lora_dropout": 0.05, "status": "failed",
         "error": 'ValueError: "loss"\tis nan\nat step 3', "hostname": "None", "train_loss": np.nan},
    ])
    ledger.write_table(table, tmp_path / "t.tsv")
    back = ledger.read_table(tmp_path / "t.tsv")
    pd.testing.assert_frame_equal(back, table)
    first = back.to_dict("records")[0]
    assert first["lora_alpha"] == 16 and back["lora_alpha"].dtype.kind == "i"
    assert first["learning_rate"] == 0.000316 and first["train_loss"] == 1 / 3
    assert space.trial_id(first) == "r64_a16_lr0.000316"
    # Only empty cells are missing: the texts "NA" and "None" stay text.
    assert list(back["hostname"]) == ["NA", "None"]


def test_empty_table_with_header_round_trips(tmp_path):
    empty = pd.DataFrame(columns=["seed", "arm", "round", "trial_id", "lora_rank"])
    ledger.write_table(empty, tmp_path / "proposals.tsv")
    assert (tmp_path / "proposals.tsv").read_text() == "seed\tarm\tround\ttrial_id\tlora_rank\n"
    back = ledger.read_table(tmp_path / "proposals.tsv")
    assert list(back.columns) == list(empty.columns) and len(back) == 0


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv: table not found"):
        ledger.read_table(tmp_path / "nowhere.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.tsv: empty file"):
        ledger.read_table(tmp_path / "empty.tsv")
    with pytest.raises(FileNotFoundError, match=r"r4_a4_lr0\.01/metrics\.json: trial metrics not found"):
        ledger.read_metrics(tmp_path / "r4_a4_lr0.01" / "metrics.json")
    (tmp_path / "half.json").write_text('{"status": "ok", "train_loss": 1.2')
    with pytest.raises(ValueError, match=r"half\.json: not valid JSON \(line 1") as error:
        ledger.read_metrics(tmp_path / "half.json")
    assert "\n" not in str(error.value)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got list"):
        ledger.read_metrics(tmp_path / "list.json")


# ---- histories -------------------------------------------------------------------------
def test_history_joins_proposals_with_their_metrics(tmp_path):
    space, (history_path,) = make_study(tmp_path, arms=("gptune",), pilot_n=10, rounds=2, batch=3)
    history = ledger.read_table(history_path)

    assert list(history.columns[:9]) == [
        "seed", "arm", "round", "trial_id", "lora_rank", "lora_alpha", "learning_rate",
        "lora_dropout", "status",
    ]
    rest = list(history.columns[9:])
    assert rest == sorted(rest) and {"train_loss", "train_time", "error", "finished_at"} <= set(rest)
    assert "provenance" not in history.columns  # nested, left out of tables
    assert list(history["round"]) == [0] * 10 + [1] * 3 + [2] * 3
    assert list(history["arm"]) == ["gptune"] * 16  # round 0 of the arm, as the workflow writes it
    for row in history.to_dict("records"):
        assert row["trial_id"] == space.trial_id(row)
        assert row["lora_alpha"] in STUDY_SPACE["lora_alpha"]["values"]
    assert history["lora_rank"].dtype.kind == "i" and history["lora_alpha"].dtype.kind == "i"

    failed = history[history["status"] == "failed"]
    assert len(failed) > 0 and (history["status"] == "ok").sum() > 0
    assert failed["train_loss"].isna().all()
    assert failed["error"].str.startswith("OutOfMemoryError").all()
    assert set(history["status"]) == {"ok", "failed"}
    # The metrics echo the hyperparameters and trial id; nothing is duplicated.
    assert len(set(history.columns)) == len(history.columns)


def test_missing_status_means_ok_and_scalars_only(study_space):
    space = study_space
    point = space.snap({"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-3})
    proposals = pd.DataFrame([{"seed": 1, "arm": "pilot", "round": 0, "trial_id": space.trial_id(point), **point}])
    metrics = {space.trial_id(point): {"train_loss": 2.5, "curve": [3.0, 2.5], "provenance": {"a": 1},
                                       "seed": 99, "lora_rank": 999}}
    history = ledger.build_history(None, proposals, metrics)
    row = history.to_dict("records")[0]
    assert row["status"] == "ok" and row["train_loss"] == 2.5
    assert "curve" not in row and "provenance" not in row
    assert row["seed"] == 1 and row["lora_rank"] == 8  # the proposal's values win


def test_build_history_rejects_inconsistent_input(study_space):
    space = study_space
    points = pilot_design(space, 3, "random_sets", 0)
    ids = [space.trial_id(p) for p in points]
    proposals = pd.DataFrame([{"seed": 0, "arm": "pilot", "round": 0, "trial_id": t, **p}
                              for t, p in zip(ids, points)])
    metrics = {t: {"status": "ok", "train_loss": 1.0} for t in ids}
    with pytest.raises(ValueError, match=rf"no metrics for proposed trial\(s\) \['{ids[2]}'\]"):
        ledger.build_history(None, proposals, {t: metrics[t] for t in ids[:2]})
    with pytest.raises(ValueError, match="say they belong to 'r4_a4_lr0.01'"):
        ledger.build_history(None, proposals, {**metrics, ids[0]: {"trial_id": "r4_a4_lr0.01"}})
    history = ledger.build_history(None, proposals, metrics)
    again = proposals.assign(arm="gptune", round=1)
    with pytest.raises(ValueError, match="appear twice in one history"):
        ledger.build_history(history, again, metrics)
    with pytest.raises(ValueError, match=r"proposals: lacks column\(s\) \['round'\]"):
        ledger.build_history(None, proposals.drop(columns="round"), metrics)
    with pytest.raises(ValueError, match="previous history has parameters"):
        ledger.build_history(history.drop(columns="lora_dropout"), again, metrics)


def test_empty_round_keeps_the_history(tmp_path, study_space):
    space = study_space
    points = pilot_design(space, 2, "random_sets", 0)
    proposals = pd.DataFrame([{"seed": 0, "arm": "pilot", "round": 0, "trial_id": space.trial_id(p), **p}
                              for p in points])
    history = ledger.build_history(None, proposals, {space.trial_id(p): {"train_loss": 1.0} for p in points})
    nothing = pd.DataFrame(columns=["seed", "arm", "round", "trial_id", *space.names])
    ledger.write_table(nothing, tmp_path / "proposals.tsv")
    after = ledger.build_history(history, ledger.read_table(tmp_path / "proposals.tsv"), {})
    pd.testing.assert_frame_equal(after, history)
    first = ledger.build_history(None, ledger.read_table(tmp_path / "proposals.tsv"), {})
    assert list(first.columns) == ["seed", "arm", "round", "trial_id", *space.names, "status"]


def test_collect_trials_keeps_the_pilot_once_per_seed(tmp_path):
    space, finals = make_study(tmp_path, seeds=(0, 1), arms=("gptune", "random"), pilot_n=6,
                               rounds=2, batch=2)
    trials = ledger.collect_trials(ledger.read_table(p) for p in finals)

    assert list(trials.columns[:4]) == ["seed", "arm", "round", "trial_id"]
    for seed in (0, 1):
        per_seed = trials[trials["seed"] == seed]
        assert list(per_seed["arm"]) == ["pilot"] * 6 + ["gptune"] * 4 + ["random"] * 4
        pilot = per_seed[per_seed["arm"] == "pilot"]
        assert (pilot["round"] == 0).all() and pilot["trial_id"].is_unique
        expected = [space.trial_id(p) for p in pilot_design(space, 6, "random_sets", seed)]
        assert list(pilot["trial_id"]) == expected
        for arm in ("gptune", "random"):
            assert list(per_seed.loc[per_seed["arm"] == arm, "round"]) == [1, 1, 2, 2]
    assert list(trials["seed"]) == [0] * 14 + [1] * 14
    assert (trials["status"] == "failed").any()
    assert trials["lora_alpha"].dtype.kind == "i"

    # Written and read back, the tidy table is the same.
    ledger.write_table(trials, tmp_path / "trials.tsv")
    pd.testing.assert_frame_equal(ledger.read_table(tmp_path / "trials.tsv"), trials)


def test_collect_trials_rejects_disagreeing_pilots(tmp_path):
    _, finals = make_study(tmp_path, arms=("gptune", "random"), pilot_n=4, rounds=1, batch=1)
    first, second = (ledger.read_table(p) for p in finals)
    second = second.drop(index=0)
    with pytest.raises(ValueError, match="seed 0: the pilot rows of random differ from those of gptune"):
        ledger.collect_trials([first, second])
    with pytest.raises(ValueError, match="no histories"):
        ledger.collect_trials([])


# ---- GPTune's history database -----------------------------------------------------------
def test_gptune_db_has_historydb_layout(tmp_path):
    space, (history_path,) = make_study(tmp_path, arms=("gptune",), pilot_n=10, rounds=1, batch=2)
    history = ledger.read_table(history_path)
    db = ledger.to_gptune_db(history, space, OBJECTIVES, "demo-gptune-seed0")

    assert db["tuning_problem_name"] == "demo-gptune-seed0"
    assert db["surrogate_model"] == [] and len(db["func_eval"]) == len(history)
    document = db["func_eval"][0]
    assert set(document) == {
        "task_parameter", "tuning_parameter", "constants", "machine_configuration",
        "software_configuration", "evaluation_result", "evaluation_detail", "additional_output",
        "source", "time", "uid",
    }
    row = history.iloc[0]
    assert document["tuning_parameter"] == {
        "lora_rank": int(row["lora_rank"]), "lora_alpha": int(row["lora_alpha"]),
        "learning_rate": float(row["learning_rate"]),
    }
    assert type(document["tuning_parameter"]["lora_alpha"]) is int
    assert document["constants"] == {"lora_dropout": 0.05}
    assert document["machine_configuration"] == {"machine_name": "loratune"}
    assert document["source"] == "measure"
    assert document["time"] == {"tm_year": 2026, "tm_mon": 11, "tm_mday": 29, "tm_hour": 10,
                                "tm_min": 0, "tm_sec": 7, "tm_wday": 6, "tm_yday": 333, "tm_isdst": 0}
    assert set(document["evaluation_detail"]) == set(OBJECTIVES)

    uids = [d["uid"] for d in db["func_eval"]]
    assert len(set(uids)) == len(uids)
    assert uids == [d["uid"] for d in ledger.to_gptune_db(history, space, OBJECTIVES, "x")["func_eval"]]

    failed = [d for d in db["func_eval"] if d["additional_output"]["status"] == "failed"]
    ok = [d for d in db["func_eval"] if d["additional_output"]["status"] == "ok"]
    assert failed and ok
    assert all(v is None for d in failed for v in d["evaluation_result"].values())
    assert all(d["evaluation_detail"]["train_loss"]["evaluations"] == [] for d in failed)
    assert all(d["additional_output"]["error"].startswith("OutOfMemoryError") for d in failed)
    assert all(isinstance(v, float) for d in ok for v in d["evaluation_result"].values())
    # GPTune reads it as strict JSON.
    json.loads(json.dumps(db, allow_nan=False))


def test_gptune_db_round_trips(tmp_path):
    space, (history_path,) = make_study(tmp_path, arms=("random",), pilot_n=8, rounds=2, batch=2)
    history = ledger.read_table(history_path)
    db = ledger.to_gptune_db(history, space, OBJECTIVES, "demo")
    pd.testing.assert_frame_equal(ledger.from_gptune_db(db), history)

    # Through the file the workflow writes (sorted keys): same table, columns alphabetical.
    files.atomic_write_json(tmp_path / "random.json", db)
    back = ledger.from_gptune_db(json.loads((tmp_path / "random.json").read_text()))
    pd.testing.assert_frame_equal(back, history, check_like=True)
    assert back["lora_alpha"].dtype.kind == "i"
    assert math.isnan(back.loc[back["status"] == "failed", "train_loss"].iloc[0])


def test_gptune_db_errors_are_clear(study_space):
    space = study_space
    history = pd.DataFrame(columns=["seed", "arm", "round", "trial_id", *space.names, "status"])
    with pytest.raises(ValueError, match=r"history \(objectives\): lacks column\(s\) \['train_loss'"):
        ledger.to_gptune_db(history, space, OBJECTIVES, "x")
    with pytest.raises(ValueError, match="expected an object with a 'func_eval' list"):
        ledger.from_gptune_db({"tuning_problem_name": "x"})
    with pytest.raises(ValueError, match=r"func_eval\[0\] lacks"):
        ledger.from_gptune_db({"func_eval": [{"tuning_parameter": {}}]})
