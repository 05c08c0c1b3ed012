"""GPTune as a proposer: it learns (beats random search on ZDT1), keeps one model per
objective, repeats itself exactly across processes, and runs its one- and three-objective
paths. Real GPTune 2.0.0, GPy and pygmo throughout; nothing is evaluated by the proposer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loratune import SearchSpace, make_proposer
from loratune.benchmarks import evaluate, reference_point
from loratune.designs import pilot_design
from loratune.pareto import hypervolume

REPO = Path(__file__).resolve().parents[1]

STUDY_SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
}
TWO = {"train_loss": "min", "train_time": "min"}


@pytest.fixture(scope="module")
def space():
    return SearchSpace.from_config(STUDY_SPACE)


def run_trials(space, problem, objectives, points, seed=0):
    return pd.DataFrame(
        [{**p, **evaluate(problem, space, p, objectives, seed=seed), "status": "ok"} for p in points]
    )


def search(space, name, problem, objectives, seed, pilot, batches, **options):
    """The workflow's loop in miniature: a pilot, then rounds of proposals and trials."""
    history = run_trials(space, problem, objectives, pilot_design(space, pilot, "random", seed))
    proposer = make_proposer(name, space=space, objectives=objectives, seed=seed, **options)
    for batch in batches:
        new = proposer.propose(history, batch)
        assert len(new) == batch
        history = pd.concat([history, run_trials(space, problem, objectives, new)], ignore_index=True)
    return history


def test_gptune_beats_random_search_on_zdt1(space):
    # Same budget: 6 pilot points, then 10 from the proposer (GPTune in rounds of 4, 4, 2).
    ref = reference_point("zdt1", 2)
    wins, gptune_hv, random_hv = 0, [], []
    for seed in range(5):
        tuned = search(space, "gptune", "zdt1", TWO, seed, 6, [4, 4, 2])
        drawn = search(space, "random", "zdt1", TWO, seed, 6, [10])
        gptune_hv.append(hypervolume(tuned[list(TWO)].to_numpy(), ref))
        random_hv.append(hypervolume(drawn[list(TWO)].to_numpy(), ref))
        wins += gptune_hv[-1] > random_hv[-1]
    assert np.median(gptune_hv) > np.median(random_hv), (gptune_hv, random_hv)
    assert wins >= 4, (gptune_hv, random_hv)


def test_one_distinct_model_per_objective_fit_on_ok_rows_only(space):
    history = run_trials(space, "zdt1", TWO, pilot_design(space, 10, "lhs", 1))
    history.loc[[2, 7], "status"] = "failed"
    proposer = make_proposer("gptune", space=space, objectives=TWO, seed=0)
    proposer.propose(history, 2)
    loss_model, time_model = proposer.last_models
    assert loss_model is not time_model and loss_model.M is not time_model.M

    ok = history[history["status"] == "ok"]
    X = space.to_unit_rows(ok)
    for model, column in zip(proposer.last_models, TWO):
        # Each GP holds the 8 ok rows (in some order) and its own objective, standardized.
        y = ok[column].to_numpy()
        ours, its = np.lexsort(X.T[::-1]), np.lexsort(model.M.X.T[::-1])
        np.testing.assert_allclose(model.M.X[its], X[ours])
        np.testing.assert_allclose(model.M.Y.ravel()[its], ((y - y.mean()) / y.std())[ours], atol=1e-12)

    probe = np.random.default_rng(0).random((20, space.dim))
    mu_loss = np.array([loss_model.predict(x, tid=0)[0].item() for x in probe])
    mu_time = np.array([time_model.predict(x, tid=0)[0].item() for x in probe])
    assert np.abs(mu_loss - mu_time).max() > 0.1


PROPOSE_IN_SUBPROCESS = """
import json, sys
import pandas as pd
from loratune import SearchSpace, make_proposer
space = SearchSpace.from_config(json.loads(sys.argv[1]))
history = pd.read_json(sys.argv[2], orient="records")
proposer = make_proposer("gptune", space=space, objectives=json.loads(sys.argv[3]), seed=5)
print(json.dumps(proposer.propose(history, 3)))
"""


def test_same_proposals_in_a_fresh_process_and_other_seeds_differ(space, tmp_path):
    history = run_trials(space, "zdt1", TWO, pilot_design(space, 8, "random", 2))
    history_file = tmp_path / "history.json"
    history.to_json(history_file, orient="records", double_precision=15)
    reread = pd.read_json(history_file, orient="records")

    here = make_proposer("gptune", space=space, objectives=TWO, seed=5).propose(reread, 3)
    arguments = [json.dumps(STUDY_SPACE), str(history_file), json.dumps(TWO)]
    out = subprocess.run(
        [sys.executable, "-c", PROPOSE_IN_SUBPROCESS, *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert make_proposer("gptune", space=space, objectives=TWO, seed=6).propose(reread, 3) != here


def test_single_objective_batch_by_kriging_believer(space):
    objectives = {"train_loss": "min"}
    history = run_trials(space, "lora_surrogate", objectives, pilot_design(space, 8, "random", 0))
    proposer = make_proposer("gptune", space=space, objectives=objectives, seed=0)
    batch = proposer.propose(history, 4)
    keys = {space.key(p) for p in batch}
    assert len(keys) == 4 and not keys & {space.key(r) for r in history.to_dict("records")}
    assert all(p == space.snap(p) for p in batch)
    (model,) = proposer.last_models
    assert model.M.X.shape[0] == 8, "the believer's fantasies leaked into the fitted model"
    # EI lands where the model predicts a low loss: the batch beats the pilot's median.
    new_losses = run_trials(space, "lora_surrogate", objectives, batch)["train_loss"]
    assert new_losses.min() < history["train_loss"].median()


def test_three_objectives_on_dtlz2(space):
    objectives = {"f1": "min", "f2": "min", "f3": "max"}
    history = search(space, "gptune", "dtlz2", objectives, 0, 8, [3, 3])
    assert len({space.key(r) for r in history.to_dict("records")}) == 14
    proposer = make_proposer("gptune", space=space, objectives=objectives, seed=0)
    assert len(proposer.propose(history, 4)) == 4
    assert len(proposer.last_models) == 3


def test_too_little_data_falls_back_to_a_space_filling_design(space, caplog):
    objectives = {"train_loss": "min", "train_time": "min"}
    one = run_trials(space, "zdt1", objectives, pilot_design(space, 1, "random", 0))
    flat = run_trials(space, "zdt1", objectives, pilot_design(space, 4, "random", 0))
    flat[list(objectives)] = 1.0
    proposer = make_proposer("gptune", space=space, objectives=objectives, seed=0)
    for history in (one, flat):
        with caplog.at_level(logging.INFO, logger="loratune.proposers.gptune"):
            caplog.clear()
            batch = proposer.propose(history, 3)
        assert len(batch) == 3 and proposer.last_models == []
        assert "space-filling" in caplog.text


def test_quiet_on_stdout_and_writes_no_files(space, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    history = run_trials(space, "zdt1", TWO, pilot_design(space, 8, "random", 3))
    make_proposer("gptune", space=space, objectives=TWO, seed=0).propose(history, 2)
    make_proposer("gptune", space=space, objectives={"train_loss": "min"}, seed=0).propose(history, 2)
    assert capfd.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []
