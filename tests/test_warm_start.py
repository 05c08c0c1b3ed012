"""Warm start: GPTune databases read back, the config checks, the transfer to proposers, and the
bookkeeping of a real workflow (same-setting trials never retrained nor proposed again, their
provenance in trials.tsv; a related task's rows reaching the proposer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import load_test_config, run_workflow, write_config
from loratune import ledger, warm_start
from loratune.config import ConfigError, validate_config
from loratune.loop import next_proposals
from loratune.proposers.base import RELATED_COLUMN

OBJECTIVES = {"eval_loss": "min", "trainable_params": "min"}


def _history(space, n=6, seed=0):
    from loratune.designs import pilot_design

    rng = np.random.default_rng(seed)
    rows = []
    for i, point in enumerate(pilot_design(space, n, "lhs", seed)):
        rows.append(
            {
                "seed": 0,
                "arm": "pilot",
                "round": 0,
                "trial_id": space.trial_id(point),
                **point,
                "status": "failed" if i == 1 else "ok",
                "eval_loss": np.nan if i == 1 else float(rng.uniform(1, 3)),
                "trainable_params": np.nan if i == 1 else float(point["lora_rank"] * 1000),
            }
        )
    return pd.DataFrame(rows)


def _benchmark_config(tmp_path, **extra):
    config = {
        "study": "target",
        "backend": "benchmark",
        "benchmark": {"problem": "lora_surrogate"},
        "results_dir": str(tmp_path / "results"),
        "objectives": dict(OBJECTIVES),
        "search_space": {
            "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
            "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
            "lora_dropout": {"type": "fixed", "value": 0.05},
        },
    }
    config.update(extra)
    return config


# ---- GPTune databases --------------------------------------------------------------------
def test_our_gptune_export_round_trips_through_the_warm_start_reader(tmp_path, study_space):
    history = _history(study_space)
    path = tmp_path / "gptune_db" / "seed0" / "optuna-gp.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(ledger.to_gptune_db(history, study_space, OBJECTIVES, "study-arm")))
    config = _benchmark_config(tmp_path, warm_start=[{"path": str(path), "format": "gptune"}])
    validate_config(config)
    (source,) = warm_start.load_sources(config, study_space, OBJECTIVES)
    assert source.kind == warm_start.RELATED  # a GPTune file carries no provenance
    back = source.rows
    assert list(back["source_trial_id"]) == list(history["trial_id"])
    for name in [*study_space.names, "status"]:
        assert list(back[name]) == list(history[name])
    pd.testing.assert_frame_equal(
        back[list(OBJECTIVES)].reset_index(drop=True), history[list(OBJECTIVES)], check_dtype=False
    )


def _write_gptune_own_database(folder: Path) -> Path:
    """A HistoryDB file written by GPTune 2.0.0 itself: two evaluations in original units, the
    second one failed (NaN results, which GPTune stores as null)."""
    from loratune.proposers import _autotune
    from loratune.proposers.gptune import _import_gptune

    modules = _import_gptune()
    import database  # GPTune's flat module, importable once _import_gptune put its folder on sys.path

    parameters = _autotune.Space(
        [
            _autotune.Integer(4, 256, transform="normalize", name="lora_rank"),
            _autotune.Integer(4, 256, transform="normalize", name="lora_alpha"),
            _autotune.Real(1e-5, 1e-2, transform="normalize", name="learning_rate"),
        ]
    )
    tasks = _autotune.Space([_autotune.Real(0.0, 1.0, transform="normalize", name="task")])
    outputs = _autotune.Space([_autotune.Real(-np.inf, np.inf, name=name) for name in OBJECTIVES])
    problem = modules["Problem"](_autotune.TuningProblem(tasks, parameters, outputs))
    before = os.getcwd()
    os.chdir(folder)  # HistoryDB writes ./gptune.db/<problem>.json
    try:
        db = database.HistoryDB(
            meta_dict={
                "tuning_problem_name": "lora",
                "machine_configuration": {"machine_name": "h200"},
                "loadable_machine_configurations": {"h200": {}},
            }
        )
        Path("gptune.db").mkdir(exist_ok=True)
        Path("gptune.db/lora.json").write_text(json.dumps({"tuning_problem_name": "lora", "func_eval": []}))
        X = parameters.transform([[16, 32, 3e-4], [64, 8, 1e-2]])
        Y = np.array([[1.25, 1.0e6], [np.nan, np.nan]])
        db.store_func_eval(problem, tasks.transform([[0.5]])[0], X, Y, Y[:, :, None])
    finally:
        os.chdir(before)
    return folder / "gptune.db" / "lora.json"


def test_a_database_gptune_wrote_loads_with_its_failed_evaluation(tmp_path, study_space):
    path = _write_gptune_own_database(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["func_eval"][1]["evaluation_result"] == {"eval_loss": None, "trainable_params": None}
    config = _benchmark_config(tmp_path, warm_start=[{"path": str(path), "format": "gptune"}])
    validate_config(config)
    (source,) = warm_start.load_sources(config, study_space, OBJECTIVES)
    rows = source.rows
    assert rows[["lora_rank", "lora_alpha", "learning_rate"]].values.tolist() == [[16, 32, 3e-4], [64, 8, 1e-2]]
    assert list(rows["status"]) == ["ok", "failed"]
    assert rows["eval_loss"].iloc[0] == 1.25 and np.isnan(rows["eval_loss"].iloc[1])
    # Only the measured one is fitted as a related task.
    related = warm_start.related_rows(config, study_space, OBJECTIVES, seed=0)
    assert len(related) == 2 and set(related["source"]) == {str(path)}


# ---- config checks ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "warm_start[0].path: {path}: no such file"),
        ("unreadable", "warm_start[0].path: {path}: unreadable as a GPTune database"),
        ("outside", "warm_start[0].path: {path}: no trial inside the search space"),
        ("objective", "warm_start[0].path: {path}: lacks the objective(s) ['trainable_params']"),
    ],
)
def test_a_bad_warm_start_source_fails_in_one_line_naming_it(tmp_path, study_space, case, message):
    path = tmp_path / "source.json"
    history = _history(study_space)
    if case == "unreadable":
        path.write_text('{"func_eval": [')
    elif case == "outside":
        history["lora_rank"] = 512
        path.write_text(json.dumps(ledger.to_gptune_db(history, study_space, OBJECTIVES, "x")))
    elif case == "objective":
        study = history.drop(columns=["trainable_params"])
        path.write_text(json.dumps(ledger.to_gptune_db(study, study_space, {"eval_loss": "min"}, "x")))
    config = _benchmark_config(tmp_path, warm_start=[{"path": str(path), "format": "gptune"}])
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert str(error.value).startswith(message.format(path=path))
    assert "\n" not in str(error.value)


# ---- the transfer to the proposers ---------------------------------------------------------
def test_standardized_transfer_moves_the_related_task_to_this_studys_scale(study_space):
    own = _history(study_space, n=4, seed=1)
    related = _history(study_space, n=6, seed=2).assign(eval_loss=lambda t: t["eval_loss"] + 10.0)
    related = related.drop(columns=["seed", "arm", "round", "trial_id"])
    fitted = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "standardized")
    moved = fitted.iloc[: len(fitted) - len(own)]
    ok = moved["status"] == "ok"
    mine = own.loc[own["status"] == "ok", "eval_loss"]
    assert moved.loc[ok, "eval_loss"].mean() == pytest.approx(mine.mean())
    assert moved.loc[ok, "eval_loss"].std() == pytest.approx(mine.std())
    plain = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "observations")
    assert plain["eval_loss"].iloc[0] == related["eval_loss"].iloc[0]  # as measured
    # The study's own rows come last and unchanged; without related rows nothing changes.
    tail = fitted.iloc[len(fitted) - len(own) :].reset_index(drop=True)
    pd.testing.assert_frame_equal(tail[own.columns], own, check_dtype=False)
    assert warm_start.transfer_history(study_space, OBJECTIVES, own, None) is own


def test_robust_transfer_matches_median_and_quartiles_whatever_the_outliers(study_space):
    own = _history(study_space, n=8, seed=1)
    related = _history(study_space, n=9, seed=2).drop(columns=["seed", "arm", "round", "trial_id"])
    related.loc[related.index[-1], "eval_loss"] = 10.0  # a diverged run among losses of 1 to 3
    fitted = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "robust")
    moved = fitted.iloc[: len(fitted) - len(own)]
    moved, mine = moved.loc[moved["status"] == "ok", "eval_loss"], own.loc[own["status"] == "ok", "eval_loss"]
    assert moved.median() == pytest.approx(mine.median())
    assert moved.quantile(0.75) - moved.quantile(0.25) == pytest.approx(mine.quantile(0.75) - mine.quantile(0.25))
    # The mean and standard deviation are the outlier's: "standardized" lands elsewhere.
    standardized = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "standardized")
    assert standardized["eval_loss"].iloc[0] != pytest.approx(fitted["eval_loss"].iloc[0])


def test_fading_transfer_drops_the_related_task_once_the_study_has_its_own_trials(study_space):
    related = _history(study_space, n=6, seed=2).drop(columns=["seed", "arm", "round", "trial_id"])
    early = _history(study_space, n=warm_start.FADE_AFTER, seed=1)  # one of them failed: FADE_AFTER - 1 ok
    fitted = warm_start.transfer_history(study_space, OBJECTIVES, early, related, "fading")
    standardized = warm_start.transfer_history(study_space, OBJECTIVES, early, related, "standardized")
    pd.testing.assert_frame_equal(fitted, standardized)
    assert len(fitted) > len(early)
    late = _history(study_space, n=warm_start.FADE_AFTER + 1, seed=1)
    assert warm_start.transfer_history(study_space, OBJECTIVES, late, related, "fading") is late


def test_aligned_transfer_keeps_an_objective_both_tasks_measure_alike(study_space):
    # _history's trainable_params is rank * 1000 on both tasks; the losses differ by 10.
    own = _history(study_space, n=6, seed=1)
    related = pd.concat([own, _history(study_space, n=6, seed=2)], ignore_index=True)
    related = related.drop(columns=["seed", "arm", "round", "trial_id"]).assign(eval_loss=lambda t: t["eval_loss"] + 10)
    related[study_space.tunable_names] = _history(study_space, n=12, seed=3)[study_space.tunable_names]
    fitted = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "aligned")
    moved = fitted.iloc[: len(fitted) - len(own)]
    assert len(moved) == len(related)
    np.testing.assert_array_equal(moved["trainable_params"], related["trainable_params"])  # as measured
    mine = own.loc[own["status"] == "ok", "eval_loss"]
    assert moved.loc[moved["status"] == "ok", "eval_loss"].mean() == pytest.approx(mine.mean())
    standardized = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "standardized")
    ok = (related["status"] == "ok").to_numpy()
    assert not np.allclose(standardized["trainable_params"].iloc[: len(related)][ok], related["trainable_params"][ok])


# ---- the workflow ------------------------------------------------------------------------
def _source_study(tmp_path: Path) -> Path:
    """A finished tiny study: a pilot of 3 and one random round of 2, seed 0."""
    config = load_test_config("tiny_benchmark.yaml")
    config.update(study="source", seeds=[0], pilot={"design": "lhs", "n": 3})
    config["arms"] = {"random": {"proposer": "random", "rounds": 1, "batch_size": 2}}
    run_workflow(tmp_path, write_config(tmp_path / "source.yaml", config), "-q")
    return tmp_path / "results" / "source" / "trials.tsv"


def test_same_setting_trials_are_observations_never_retrained_nor_proposed(tmp_path):
    source = _source_study(tmp_path)
    earlier = ledger.read_table(source)
    config = load_test_config("tiny_benchmark.yaml")
    config.update(study="warm", seeds=[0], pilot={"design": "lhs", "n": 6})
    config["arms"] = {"random": {"proposer": "random", "rounds": 1, "batch_size": 2}}
    config["warm_start"] = [{"path": "results/source/trials.tsv"}]
    result = run_workflow(tmp_path, write_config(tmp_path / "warm.yaml", config))
    out = tmp_path / "results" / "warm"
    trials = ledger.read_table(out / "trials.tsv")
    warm = trials[trials["source"].notna()]
    # All 5 earlier trials are this study's pilot observations, with their provenance and values.
    assert sorted(warm["trial_id"]) == sorted(earlier["trial_id"])
    assert set(warm["source"]) == {"results/source/trials.tsv"} and set(warm["round"]) == {0}
    merged = warm.merge(earlier, on="trial_id", suffixes=("", "_before"))
    assert np.allclose(merged["train_loss"], merged["train_loss_before"])
    # The pilot trained only pilot.n - 5 = 1 new point; the arm 2; nothing else trained.
    own = trials[trials["source"].isna()]
    assert len(own[own["arm"] == "pilot"]) == 1 and len(own[own["arm"] == "random"]) == 2
    assert result.stderr.count("rule train_trial:") == 3
    for trial_id in warm["trial_id"]:
        folder = out / "seed0" / "trials" / trial_id
        assert not (folder / "train.log").exists()  # no job ran there
        assert json.loads((folder / "metrics.json").read_text())["warm_start"] == warm_start.SAME
    # Never proposed again: the arm's proposals avoid every observation.
    proposed = ledger.read_table(out / "seed0" / "random" / "round1" / "proposals.tsv")
    assert not set(proposed["trial_id"]) & set(earlier["trial_id"])
    # A second run finds nothing to do.
    again = run_workflow(tmp_path, tmp_path / "warm.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_related_task_reaches_the_proposer_and_stays_out_of_the_trials(tmp_path, monkeypatch):
    source = _source_study(tmp_path)
    config = load_test_config("tiny_benchmark.yaml")
    # Another problem: another task, so the earlier trials are related, not observations.
    config.update(study="related", seeds=[0], benchmark={"problem": "zdt2"}, pilot={"design": "lhs", "n": 3})
    config["arms"] = {"optuna-tpe": {"proposer": "optuna", "options": {"sampler": "tpe"}, "rounds": 1, "batch_size": 2}}
    config["warm_start"] = [{"path": "results/source/trials.tsv"}]
    run_workflow(tmp_path, write_config(tmp_path / "related.yaml", config), "-q")
    out = tmp_path / "results" / "related"
    trials = ledger.read_table(out / "trials.tsv")
    assert "source" not in trials.columns and len(trials) == 5  # a pilot of 3 and 2 proposals: own trials only
    monkeypatch.chdir(tmp_path)  # the warm_start path is relative to the workflow's directory
    study = validate_config(config)
    arm = study.arm("optuna-tpe")
    pilot = ledger.read_table(out / "seed0" / "pilot" / "round0" / "history.tsv")
    proposed = ledger.read_table(out / "seed0" / "optuna-tpe" / "round1" / "proposals.tsv")
    related = warm_start.related_rows(study.config, study.space, study.objectives, 0)
    assert len(related) == len(ledger.read_table(source))
    with_related = next_proposals(study.space, study.objectives, arm, pilot, 0, 1, related=related)
    cold = next_proposals(study.space, study.objectives, arm, pilot, 0, 1)
    assert [study.space.trial_id(p) for p in with_related] == list(proposed["trial_id"])
    assert with_related != cold


def test_a_study_recorded_before_warm_start_existed_is_unchanged_by_its_empty_default():
    from loratune.study_state import change_scope, config_differences

    assert config_differences({"pilot": {"n": 6}}, {"pilot": {"n": 6}, "warm_start": []}) == []
    ((field, old, new),) = config_differences({"warm_start": []}, {"warm_start": [{"path": "a.tsv"}]})
    assert field == "warm_start" and change_scope(field, "qlora") == "pilot"


def test_a_proposer_that_models_the_related_task_may_measure_its_points_here():
    """On a space of four points, two measured here and the other two by a related task: BoTorch,
    which fits the related rows as another task of a multi-task GP, proposes those two; the
    proposers that pool them with this study's rows take them as observations (nothing left)."""
    from loratune.proposers import make_proposer
    from loratune.space import SearchSpace

    space = SearchSpace.from_config(
        {"lora_rank": {"type": "choice", "values": [4, 8]}, "lora_alpha": {"type": "choice", "values": [16, 32]}}
    )
    grid = [{"lora_rank": r, "lora_alpha": a} for r in (4, 8) for a in (16, 32)]
    rows = pd.DataFrame(grid).assign(eval_loss=[1.0, 2.0, 3.0, 4.0], trainable_params=[4.0, 4.0, 8.0, 8.0], status="ok")
    own, related = rows.iloc[[0, 3]], rows.iloc[[1, 2]]
    fitted = warm_start.transfer_history(space, OBJECTIVES, own, related, "aligned")
    assert list(fitted[RELATED_COLUMN]) == [True, True, False, False]
    botorch = make_proposer("botorch", space=space, objectives=OBJECTIVES, seed=0)
    proposed = botorch.propose(fitted, n=4)
    assert sorted(space.key(p) for p in proposed) == sorted(
        space.key(p) for p in related[space.tunable_names].to_dict("records")
    )
    for name, options in [("random", {}), ("optuna", {"sampler": "gp"})]:
        assert make_proposer(name, space=space, objectives=OBJECTIVES, seed=0, **options).propose(fitted, n=4) == []


def test_the_multi_task_model_follows_this_task_where_the_related_one_disagrees():
    """A related task whose loss runs the other way (its best where this task's is worst): pooled
    with this study's four rows it moves the predicted best; as another task of BoTorch's
    multi-task GP, whose fitted task covariance weighs it by agreement, it does not."""
    import torch

    from loratune.proposers import make_proposer
    from loratune.space import SearchSpace

    space = SearchSpace.from_config({"learning_rate": {"type": "float", "low": 0.0, "high": 1.0}})
    own_x, related_x = np.array([0.0, 0.35, 0.65, 1.0]), np.linspace(0.0, 1.0, 12)
    X = np.concatenate([own_x, related_x])[:, None]
    loss = np.concatenate([(own_x - 0.3) ** 2, 1.0 - (related_x - 0.3) ** 2])[:, None]
    own = np.arange(len(X)) < len(own_x)
    proposer = make_proposer("botorch", space=space, objectives={"eval_loss": "min"}, seed=0)
    grid = torch.linspace(0, 1, 101, dtype=torch.double)[:, None]
    models = proposer._fit_multitask(X, -loss, own), proposer._fit(torch.tensor(X), torch.tensor(-loss))
    with torch.no_grad():
        multitask, pooled = (model.posterior(grid).mean.squeeze() for model in models)
    assert abs(float(grid[int(multitask.argmax())]) - 0.3) < 0.1
    assert abs(float(grid[int(pooled.argmax())]) - 0.3) > 0.1  # pooling is misled


def test_the_multi_task_model_in_lora_coordinates_sees_the_features_and_keeps_the_task(study_space):
    """With ``coordinates: lora`` the multi-task GPs are fitted on the LoRA-aware features of
    every row, the task column kept as it was, and the proposals stay new valid points."""
    import torch

    from loratune.proposers import make_proposer
    from loratune.proposers.coordinates import LoraCoordinates

    rng = np.random.default_rng(11)
    points = pd.DataFrame([study_space.from_unit(u) for u in rng.random((14, study_space.dim))])
    update = np.log(points["learning_rate"] * points["lora_alpha"] / points["lora_rank"])
    rows = points.assign(eval_loss=(update + 7.0) ** 2, trainable_params=points["lora_rank"] * 1e4, status="ok")
    own, related = rows.iloc[:4], rows.iloc[4:]
    fitted = warm_start.transfer_history(study_space, OBJECTIVES, own, related, "aligned")
    proposer = make_proposer(
        "botorch", space=study_space, objectives=OBJECTIVES, seed=0, coordinates="lora", num_restarts=2, raw_samples=64
    )
    X = study_space.to_unit_rows(fitted)
    mine = ~fitted[RELATED_COLUMN].to_numpy(bool)
    model = proposer._fit_multitask(X, -np.ones((len(X), 2)) * np.arange(len(X))[:, None], mine)
    task = torch.tensor(~mine, dtype=torch.double)[:, None]
    seen = model.models[0].input_transform(torch.cat([torch.tensor(X), task], -1))
    expected = LoraCoordinates(study_space, "lora").unit_features(torch.tensor(X))
    assert torch.allclose(seen[:, :-1], expected)
    assert torch.equal(seen[:, -1], task[:, 0])
    proposed = proposer.propose(fitted, n=2)
    assert len({study_space.key(p) for p in proposed}) == 2
    taken = {study_space.key(p) for p in rows[study_space.tunable_names].to_dict("records")}
    assert not taken & {study_space.key(p) for p in proposed}
