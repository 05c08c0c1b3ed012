"""Configs that would doom every trial, or fail late without naming what to fix, are refused by
``validate_config`` (before any job) with one line that starts with the field."""

from __future__ import annotations

import copy
import json

import pytest

from loratune.config import ConfigError, validate_config

BENCHMARK = {
    "study": "checks",
    "backend": "benchmark",
    "benchmark": {"problem": "lora_surrogate"},
    "objectives": {"eval_loss": "min", "train_time": "min"},
    "search_space": {
        "lora_rank": {"type": "int", "low": 4, "high": 64, "step": 4},
        "lora_alpha": {"type": "choice", "values": [8, 16, 32]},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    },
    "pilot": {"design": "lhs", "n": 4},
    "arms": {"random": {"proposer": "random", "rounds": 2, "batch_size": 2}},
}


@pytest.fixture
def qlora(tmp_path, monkeypatch) -> dict:
    """A real-training config whose model folder and data file exist."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    return {
        **copy.deepcopy(BENCHMARK),
        "backend": "qlora",
        "benchmark": {},
        "model": {"name": str(model)},
        "dataset": {"path": str(data), "eval_fraction": 0.2},
        "training": {"quantization": "none", "max_steps": 3, "batch_size": 2, "max_seq_length": 48},
    }


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_the_qlora_fixture_is_valid(qlora):
    validate_config(qlora)


def test_no_held_out_split_while_eval_loss_is_an_objective(qlora):
    qlora["dataset"]["eval_fraction"] = 0
    assert _error(qlora).startswith("dataset.eval_fraction: 0 holds out no example, but eval_loss is an objective")


@pytest.mark.parametrize(
    "bound, field",
    [
        ({"lora_rank": {"type": "int", "low": 0, "high": 64, "step": 4}}, "lora_rank"),
        ({"learning_rate": {"type": "float", "low": -1e-3, "high": 1e-2}}, "learning_rate"),
        ({"lora_alpha": {"type": "choice", "values": [0, 8, 16, 32, 64]}}, "lora_alpha"),
    ],
    ids=["rank-low-0", "negative-lr", "choice-0-at-the-low-end"],
)
def test_bounds_are_checked_over_the_whole_range(qlora, bound, field):
    qlora["search_space"].update(bound)
    message = _error(qlora)
    assert message.startswith("search_space") and field in message, message


def test_a_study_name_with_a_trailing_newline_is_refused():
    assert _error({**copy.deepcopy(BENCHMARK), "study": "mystudy\n"}).startswith("study: 'mystudy\\n'")


def test_results_dir_pointing_at_a_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    config = {**copy.deepcopy(BENCHMARK), "results_dir": str(tmp_path / "results")}
    assert _error(config) == f"results_dir: {tmp_path / 'results'} is a file, not a folder"


def test_choice_values_that_print_the_same_are_refused():
    config = copy.deepcopy(BENCHMARK)
    config["search_space"]["lora_alpha"] = {"type": "choice", "values": [16, "16", 32]}
    assert _error(config).startswith("search_space.lora_alpha.values: 16 and '16' give the same trial id")


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c["pilot"].update(n=12), "pilot.n: 12 trials asked for, but search_space has only 9"),
        (lambda c: c["arms"]["random"].update(rounds=3), "arms.random: pilot.n + rounds x batch_size = 10"),
    ],
    ids=["pilot", "arm"],
)
def test_a_finite_space_smaller_than_the_study_needs_is_refused(change, field):
    config = copy.deepcopy(BENCHMARK)
    config["search_space"] = {
        "lora_rank": {"type": "choice", "values": [4, 8, 16]},
        "lora_alpha": {"type": "choice", "values": [8, 16, 32]},
    }
    change(config)
    assert _error(config).startswith(field)


def test_a_bare_dataset_name_that_is_no_local_file_is_refused(qlora):
    qlora["dataset"]["path"] = "my_data"
    assert _error(qlora) == (
        "dataset.path: no such file or directory: my_data (a hub dataset id has the form owner/name)"
    )


def test_a_hub_dataset_id_while_offline_is_refused(qlora, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qlora["dataset"]["path"] = "someone/some-data"
    assert _error(qlora).startswith("dataset.path: someone/some-data is not a local path and the hub is offline")


def test_a_folder_without_data_files_is_refused(qlora, tmp_path):
    folder = tmp_path / "empty-data"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here")
    qlora["dataset"]["path"] = str(folder)
    assert _error(qlora).startswith(f"dataset.path: {folder} holds no .jsonl/")


# Needs helper house's schema generation (additionalProperties: false under model:); it fails
# on a branch without it.
def test_a_typo_under_model_is_refused_on_the_benchmark_backend():
    config = {**copy.deepcopy(BENCHMARK), "model": {"nmae": "x"}}
    assert _error(config).startswith("model")


# ---- data and model errors in prepare_dataset / prepare_model ------------------------------
def test_non_utf8_data_names_the_file(tmp_path):
    from loratune.training import DatasetSpec, prepare_dataset

    data = tmp_path / "latin1.jsonl"
    data.write_bytes(
        json.dumps({"instruction": "Café", "output": "ok"}, ensure_ascii=False)
        .encode("utf-8")
        .replace(b"\xc3\xa9", b"\xe9")
        + b"\n"
    )
    with pytest.raises(ValueError, match=rf"^dataset.path: {data}: not UTF-8 text \(byte \d+\)"):
        prepare_dataset(DatasetSpec(path=str(data)), tmp_path / "out")


def test_a_binary_file_names_the_file(tmp_path):
    from loratune.training import DatasetSpec, prepare_dataset

    data = tmp_path / "data.txt"
    data.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"^dataset.path: {data}: not UTF-8 text"):
        prepare_dataset(DatasetSpec(path=str(data)), tmp_path / "out")


def test_a_one_example_dataset_holds_out_nothing_and_says_so(tmp_path):
    from loratune.training import DatasetSpec, prepare_dataset

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"^dataset.eval_fraction: 0.01 of 1 example\(s\) .* holds out none"):
        prepare_dataset(DatasetSpec(path=str(data), eval_fraction=0.01), tmp_path / "out")


def test_a_hub_model_that_cannot_be_fetched_names_model_name(tmp_path, monkeypatch):
    from loratune.training import ModelSpec, prepare_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as caught:
        prepare_model(ModelSpec(name="nobody/no-such-model"), tmp_path)
    message = str(caught.value)
    assert message.startswith("model.name: 'nobody/no-such-model' is no local path and could not be fetched")
    assert "\n" not in message


def test_the_deadline_margin_fits_short_runtimes_and_applies_only_under_slurm(monkeypatch):
    from loratune.trial import _deadline

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert _deadline(1, 0.0) is None  # nothing enforces a wall time locally
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert _deadline(1, 0.0) == 30.0  # half of a one-minute job, not max(60 s, 10 %) = all of it
    assert _deadline(10, 0.0) == 540.0


def test_a_truncated_metrics_file_fails_update_history_in_one_line(tmp_path):
    from loratune.loop import update_history

    proposals = tmp_path / "proposals.tsv"
    proposals.write_text("seed\tarm\tround\ttrial_id\tlora_rank\n0\tpilot\t0\tr4\t4\n")
    metrics = tmp_path / "r4" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text('{"status": "ok", "trial_')
    with pytest.raises(ValueError) as caught:
        update_history(None, proposals, [metrics], tmp_path / "history.tsv")
    assert str(caught.value).startswith(f"{metrics}: not valid JSON")
    assert "run the study again to retrain that trial" in str(caught.value)
    assert not (tmp_path / "history.tsv").exists()
