"""The Optuna and BoTorch proposers (the 1- and 3-objective paths, quiet output, a learning check
on ZDT1; their proposer contract is test_proposers.py's) and the ``lora_table`` benchmark's
nearest-grid-point lookup, on a synthetic grid made here as a test fixture."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd
import pytest

from loratune import SearchSpace
from loratune.benchmarks import (
    PROBLEMS,
    LoraSurrogate,
    LoraTable,
    TabulatedTrialFailed,
    evaluate,
)
from loratune.designs import pilot_design
from loratune.pareto import REFERENCE, hypervolume, normalize
from loratune.proposers import make_proposer
# Small searches keep these tests fast; the learning test uses the defaults.
from test_proposers import FAST

TWO = {"f1": "min", "f2": "min"}
THREE = {"f1": "min", "f2": "min", "f3": "min"}


def proposer(arm, space, objectives=TWO, seed=0):
    name, options = FAST[arm]
    return make_proposer(name, space, objectives, seed=seed, **options)


def problem_values(space, point, objectives):
    """ZDT1 for two objectives, DTLZ2 for three, and ZDT1's second objective alone for one."""
    if len(objectives) == 1:
        return {"f1": evaluate("zdt1", space, point, TWO)["f2"]}
    return evaluate("zdt1" if len(objectives) == 2 else "dtlz2", space, point, objectives)


def history_of(space, points, objectives=TWO, failed=()):
    rows = []
    for i, point in enumerate(points):
        values = problem_values(space, point, objectives)
        status = "failed" if i in failed else "ok"
        if status == "failed":
            values = {name: np.nan for name in values}
        rows.append({**point, **values, "status": status})
    return pd.DataFrame(rows)


def assert_valid_new(space, proposals, history, n):
    assert len(proposals) == n
    keys = [space.key(p) for p in proposals]
    assert len(set(keys)) == n, "proposals repeat"
    taken = {space.key(row) for row in history.to_dict("records")}
    assert not taken & set(keys), "a proposal is already in the history"
    for point in proposals:
        assert point == space.snap(point), f"not snapped: {point}"


@pytest.fixture(scope="module")
def space(study_space):
    return study_space


@pytest.fixture(scope="module")
def history(space):
    points = pilot_design(space, 10, "random", seed=3)
    return history_of(space, points, failed=(2, 7))


@pytest.mark.parametrize("arm", ["botorch", "optuna-tpe"])
@pytest.mark.parametrize("size", [0, 1])
def test_tiny_histories_get_a_space_filling_design(arm, size, space):
    history = history_of(space, pilot_design(space, size, "lhs", seed=0))
    proposals = proposer(arm, space, seed=2).propose(history, 4)
    assert_valid_new(space, proposals, history, 4)


@pytest.mark.parametrize("objectives", [{"f1": "min"}, THREE], ids=["one", "three"])
@pytest.mark.parametrize("arm", ["botorch", "optuna-tpe", "optuna-gp"])
def test_one_and_three_objectives_run_through_the_model(arm, objectives, space, caplog):
    points = pilot_design(space, 8, "lhs", seed=4)
    history = history_of(space, points, objectives)
    with caplog.at_level(logging.INFO, logger="loratune.proposers"):
        proposals = proposer(arm, space, objectives, seed=3).propose(history, 2)
    assert_valid_new(space, proposals, history, 2)
    # The model-based path ran, not the space-filling fallback or the random top-up.
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "space-filling" not in messages and "short" not in messages
    assert f"{len(objectives)} objective(s)" in messages or "8 ok trials, 2 proposal(s)" in messages


def test_a_maximized_objective_is_replayed_negated(space):
    """Optuna sees minimization values: maximizing -f is minimizing f, so the proposals match."""
    points = pilot_design(space, 8, "lhs", seed=6)
    plain = history_of(space, points)
    flipped = plain.assign(f2=-plain["f2"])
    as_min = proposer("optuna-tpe", space, seed=9).propose(plain, 2)
    as_max = proposer("optuna-tpe", space, {"f1": "min", "f2": "max"}, seed=9).propose(flipped, 2)
    assert as_min == as_max


def test_optuna_handles_log_stepped_integers_and_string_choices():
    space = SearchSpace.from_config(
        {
            "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4, "log": True},
            "target_modules": {"type": "choice", "values": ["qv", "all"]},
        }
    )
    points = pilot_design(space, 6, "lhs", seed=1)
    history = pd.DataFrame(
        [{**p, "f1": space.to_unit(p)[0], "f2": 1 - space.to_unit(p)[0] + space.to_unit(p)[1]} for p in points]
    )
    for arm in ("optuna-tpe", "optuna-gp"):
        assert_valid_new(space, proposer(arm, space, seed=0).propose(history, 3), history, 3)


@pytest.mark.parametrize("arm", ["optuna-tpe", "optuna-gp", "botorch"])
def test_proposing_prints_nothing(arm, space, history, capfd):
    proposer(arm, space, seed=4).propose(history, 2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("optuna", {"sampler": "cmaes"}, r"proposer\.optuna\.sampler: unknown 'cmaes'"),
        ("optuna", {"population_size": 1}, r"proposer\.optuna\.population_size"),
        ("botorch", {"num_restarts": 0}, r"proposer\.botorch\.num_restarts"),
        ("botorch", {"input_warping": "yes"}, r"proposer\.botorch\.input_warping"),
        ("botorch", {"acq": "ei"}, r"proposer\.botorch: unknown option 'acq'"),
        ("botorch", {"acquisition": "ei"}, r"proposer\.botorch\.acquisition: unknown 'ei'"),
        ("botorch", {"nehvi_max_front": 0}, r"proposer\.botorch\.nehvi_max_front"),
        ("optuna", {"sampler": "gp", "qmc_samples": 0}, r"proposer\.optuna\.qmc_samples"),
        ("optuna", {"sampler": "gp", "deterministic": "yes"}, r"proposer\.optuna\.deterministic: must be"),
        ("optuna", {"sampler": "tpe", "deterministic": True}, r"proposer\.optuna\.deterministic: only the gp"),
    ],
)
def test_bad_options_give_one_line_errors(name, options, message, space):
    with pytest.raises(ValueError, match=message):
        make_proposer(name, space, TWO, **options)


@pytest.mark.parametrize(
    "objectives, size, expected",
    [(TWO, 40, "nehvi"), (THREE, 8, "nehvi"), (THREE, 40, "parego")],
    ids=["two-objectives", "three-small-front", "three-large-front"],
)
def test_botorch_switches_to_parego_only_for_large_three_objective_fronts(objectives, size, expected, space):
    """qLogNEHVI's cost grows with the front of 3+ objectives; past ``nehvi_max_front``
    non-dominated points the proposer uses qLogNParEGO instead, and still proposes valid,
    repeatable points."""
    history = history_of(space, pilot_design(space, size, "random", seed=6), objectives)
    made = proposer("botorch", space, objectives, seed=2)
    proposals = made.propose(history, 2)
    assert made.last_acquisition == expected
    assert_valid_new(space, proposals, history, 2)
    assert proposer("botorch", space, objectives, seed=2).propose(history, 2) == proposals
    forced = make_proposer("botorch", space, objectives, seed=2, acquisition="parego", **FAST["botorch"][1])
    assert_valid_new(space, forced.propose(history, 2), history, 2)
    assert forced.last_acquisition == "parego"


@pytest.mark.parametrize(
    "objectives, size, options, expected",
    [(TWO, 40, {}, None), (THREE, 8, {}, None), (THREE, 40, {}, 64), (TWO, 8, {"qmc_samples": 16}, 16)],
    ids=["two-objectives", "three-small-front", "three-large-front", "set"],
)
def test_optuna_gp_uses_fewer_qmc_samples_for_large_three_objective_fronts(objectives, size, options, expected, space):
    history = history_of(space, pilot_design(space, size, "random", seed=6), objectives)
    made = make_proposer("optuna", space, objectives, seed=2, sampler="gp", **options)
    proposals = made.propose(history, 2)
    assert made.last_qmc_samples == expected
    assert_valid_new(space, proposals, history, 2)


def test_optunas_gp_sampler_has_the_private_qmc_sample_count_we_set():
    """``qmc_samples`` sets GPSampler._n_qmc_samples_ehvi, which Optuna does not promise to keep:
    pyproject pins optuna to the releases that have it, and this fails first on one that renames it
    (the proposer would then warn and fall back to Optuna's own count)."""
    import optuna

    sampler = optuna.samplers.GPSampler(seed=0)
    assert isinstance(getattr(sampler, "_n_qmc_samples_ehvi", None), int)
    assert sampler._n_qmc_samples_ehvi == 128  # the "Optuna's 128" of the qmc_samples option


def test_optuna_gp_deterministic_option_runs_the_model(space):
    history = history_of(space, pilot_design(space, 8, "lhs", seed=1))
    made = make_proposer("optuna", space, TWO, seed=3, sampler="gp", deterministic=True)
    assert_valid_new(space, made.propose(history, 2), history, 2)


def test_botorch_beats_random_search_on_zdt1(space):
    """Six Latin-hypercube points, then four rounds of two: BoTorch's hypervolume beats the
    median of random search's in every one of three seeds."""
    front = np.column_stack([np.linspace(0, 1, 501), 1 - np.sqrt(np.linspace(0, 1, 501))])
    ref = np.full(2, REFERENCE)

    def final_hypervolume(name, seed):
        history = history_of(space, pilot_design(space, 6, "lhs", seed=seed))
        for round_ in range(4):
            made = make_proposer(name, space, TWO, seed=100 * seed + round_)
            history = pd.concat([history, history_of(space, made.propose(history, 2))], ignore_index=True)
        Y = history[["f1", "f2"]].to_numpy()
        return hypervolume(normalize(Y, front.min(axis=0), front.max(axis=0)), ref)

    random_median = np.median([final_hypervolume("random", seed) for seed in range(3)])
    botorch = [final_hypervolume("botorch", seed) for seed in range(3)]
    assert min(botorch) > random_median, (botorch, random_median)


# ---- lora_table -------------------------------------------------------------------------

GRID_RANKS = (4, 16, 64, 256)
GRID_ALPHAS = (4, 16, 64, 256)
GRID_LRS = (1e-5, 1e-4, 1e-3, 1e-2)


@pytest.fixture
def grid_table(tmp_path):
    """A synthetic 4 x 4 x 4 grid (values from the LoRA surrogate) with one failed run: a
    stand-in for the grid to be measured on a GPU."""
    rows = []
    surrogate = LoraSurrogate()
    for rank, alpha, lr in itertools.product(GRID_RANKS, GRID_ALPHAS, GRID_LRS):
        point = {"lora_rank": rank, "lora_alpha": alpha, "learning_rate": lr, "lora_dropout": 0.0}
        metrics = surrogate.metrics(point, None, 0.0)
        rows.append(
            {
                "lora_rank": rank,
                "lora_alpha": alpha,
                "learning_rate": lr,
                "eval_loss": metrics["eval_loss"],
                "train_loss": metrics["train_loss"],
                "train_time": metrics["train_time"],
                "status": "ok",
                "error": "",
            }
        )
    rows[5].update(status="failed", error="CUDA out of memory", eval_loss=np.nan)
    path = tmp_path / "lora_grid.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return LoraTable(path=path), pd.DataFrame(rows)


def test_lora_table_answers_grid_points_with_their_row(grid_table, space):
    table, rows = grid_table
    objectives = {"eval_loss": "min", "train_time": "min"}
    for _, row in rows[rows["status"] == "ok"].iterrows():
        point = {"lora_rank": row["lora_rank"], "lora_alpha": row["lora_alpha"], "learning_rate": row["learning_rate"]}
        metrics = evaluate(table, space, point, objectives)
        assert metrics == {name: row[name] for name in ("eval_loss", "train_loss", "train_time")}


def test_lora_table_answers_other_points_with_the_nearest_row(grid_table, space):
    table, rows = grid_table

    def row_of(rank, alpha, lr):
        match = rows[
            (rows["lora_rank"] == rank) & (rows["lora_alpha"] == alpha) & np.isclose(rows["learning_rate"], lr)
        ]
        return match.iloc[0]

    # Rank 20 lies nearer 16 than 64; lr 2e-4 is a third of a decade above 1e-4 on the log
    # scale; alpha 16 is on the grid.
    got = evaluate(table, space, {"lora_rank": 20, "lora_alpha": 16, "learning_rate": 2e-4}, {"eval_loss": "min"})
    assert got["eval_loss"] == row_of(16, 16, 1e-4)["eval_loss"]
    # Rank 100 (unit 0.381) is nearer 64 (0.238) than 256 (1.0) on the linear encoding, and
    # lr 6e-3 (0.926 on the log scale) nearer 1e-2 (1.0) than 1e-3 (0.667).
    nearest = table.nearest(space, {"lora_rank": 100, "lora_alpha": 256, "learning_rate": 6e-3})
    assert (nearest["lora_rank"], nearest["lora_alpha"], nearest["learning_rate"]) == (64, 256, 1e-2)


def test_lora_table_failures_and_errors(grid_table, space, tmp_path):
    table, rows = grid_table
    failed = rows.iloc[5]
    point = {
        "lora_rank": failed["lora_rank"],
        "lora_alpha": failed["lora_alpha"],
        "learning_rate": failed["learning_rate"],
    }
    with pytest.raises(TabulatedTrialFailed, match="CUDA out of memory"):
        evaluate(table, space, point, {"eval_loss": "min"})
    with pytest.raises(ValueError, match=r"objectives: \['peak_memory_gib'\] not measured"):
        evaluate(table, space, point, {"peak_memory_gib": "min"})
    with pytest.raises(ValueError, match=r"benchmark\.noise"):
        evaluate(table, space, point, {"eval_loss": "min"}, noise=0.1)
    with pytest.raises(FileNotFoundError, match="no measured grid"):
        evaluate(LoraTable(path=tmp_path / "absent.tsv"), space, point, {"eval_loss": "min"})


def test_lora_table_front_is_the_grids_own(grid_table, space):
    table, rows = grid_table
    objectives = {"eval_loss": "min", "train_time": "min"}
    front = table.true_front(space, objectives)
    ok = rows[rows["status"] == "ok"][list(objectives)].to_numpy()
    # Every front point is a measured row that no other row dominates.
    for y in front:
        assert np.any(np.all(np.isclose(ok, y), axis=1))
        assert not np.any(np.all(ok <= y, axis=1) & np.any(ok < y, axis=1))


def test_lora_table_is_registered_at_the_repo_path():
    table = PROBLEMS["lora_table"]
    assert isinstance(table, LoraTable)
    assert str(table.path).endswith("bench/data/lora_grid.tsv")


def test_the_measured_grid_answers_its_own_rows(space):
    table = PROBLEMS["lora_table"]
    if not table.available():
        pytest.skip(f"no measured grid at {table.path}")
    rows, _ = table.rows_in(space)
    assert len(rows) == len(table.grid()), "a measured row lies outside the study's search space"
    for _, row in rows[rows["status"] == "ok"].head(8).iterrows():
        point = {"lora_rank": row["lora_rank"], "lora_alpha": row["lora_alpha"], "learning_rate": row["learning_rate"]}
        assert evaluate("lora_table", space, point, {"eval_loss": "min"})["eval_loss"] == row["eval_loss"]
