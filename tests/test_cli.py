"""The ``loratune`` command on a tiny benchmark study run through the real workflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import REPO, load_test_config, run_workflow, write_config

from loratune.cli import main, study_status
from loratune.config import load_config, load_schema

CONFIG = load_test_config("tiny_benchmark.yaml")
OUT = f"results/{CONFIG['study']}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli_study")
    configfile = write_config(workdir / "config.yaml", CONFIG)
    run_workflow(workdir, configfile)
    return workdir, configfile


def rows_by_round(table):
    return {(r.seed, r.arm, r.round): r for r in table.itertuples(index=False)}


def test_pyproject_command_is_this_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"loratune": "loratune.cli:main"}


def test_schema_prints_the_generated_sections(capsys):
    assert main(["schema"]) == 0
    schema = yaml.safe_load(capsys.readouterr().out)
    assert schema == load_schema()
    assert schema["properties"]["training"]["properties"]["batch_size"]["default"] == 4


def test_status_of_a_finished_study_counts_every_round_done(finished):
    workdir, configfile = finished
    study = load_config(configfile)
    table = study_status(study, workdir / OUT)
    rounds = rows_by_round(table)
    # Per seed: the pilot, gptune and random 2 rounds of 2, grid 1 round of 3.
    assert len(rounds) == 2 * (1 + 2 + 2 + 1)
    for seed in (0, 1):
        assert rounds[(seed, "pilot", 0)].proposed == rounds[(seed, "pilot", 0)].ok == 4
        for arm, round_, n in (("gptune", 1, 2), ("gptune", 2, 2), ("random", 2, 2), ("grid", 1, 3)):
            row = rounds[(seed, arm, round_)]
            assert (row.proposed, row.ok, row.failed, row.stopped, row.pending) == (n, n, 0, 0, 0)


def test_status_shows_pending_failed_stopped_and_unproposed_rounds(finished, tmp_path, capsys):
    workdir, configfile = finished
    copy = tmp_path / "work"
    shutil.copytree(workdir / "results", copy / "results")
    study_dir = copy / OUT
    trials = study_dir / "seed0" / "trials"
    random_round1 = (study_dir / "seed0" / "random" / "round1" / "proposals.tsv").read_text().splitlines()
    first, second = (line.split("\t")[3] for line in random_round1[1:3])
    metrics = json.loads((trials / first / "metrics.json").read_text())
    (trials / first / "metrics.json").write_text(json.dumps({**metrics, "status": "stopped"}))
    (trials / second / "metrics.json").unlink()
    gptune_round1 = (study_dir / "seed0" / "gptune" / "round1" / "proposals.tsv").read_text().splitlines()
    failed = gptune_round1[1].split("\t")[3]
    metrics = json.loads((trials / failed / "metrics.json").read_text())
    (trials / failed / "metrics.json").write_text(json.dumps({**metrics, "status": "failed", "train_loss": None}))
    (study_dir / "seed1" / "gptune" / "round2" / "proposals.tsv").unlink()

    assert main(["status", "--configfile", str(configfile), "-d", str(copy)]) == 0
    text = capsys.readouterr().out
    table = study_status(load_config(configfile), study_dir)
    rounds = rows_by_round(table)
    row = rounds[(0, "random", 1)]
    assert (row.proposed, row.ok, row.stopped, row.pending) == (2, 0, 1, 1)
    row = rounds[(0, "gptune", 1)]
    assert (row.proposed, row.ok, row.failed) == (2, 1, 1)
    assert table.loc[(table.seed == 1) & (table.arm == "gptune") & (table["round"] == 2), "proposed"].isna().all()
    assert text.startswith("study tiny-benchmark: 2 seed(s), arms ['gptune', 'random', 'grid']\n")
    assert text.rstrip().splitlines()[-1] == "trials: 25 ok, 1 failed, 1 stopped, 1 pending; rounds not proposed yet: 1"


def test_the_command_line_runs_and_a_bad_config_gives_one_line(finished, tmp_path):
    workdir, configfile = finished
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "loratune.cli", "status"]
    done = subprocess.run(
        [*command, "--configfile", str(configfile), "-d", str(workdir)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "rounds not proposed yet: 0" in done.stdout
    bad = write_config(tmp_path / "bad.yaml", {**CONFIG, "training": {"lerning_rate": 1e-4}})
    refused = subprocess.run([*command, "--configfile", str(bad)], capture_output=True, text=True, env=env)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [refused.stderr.strip()] and refused.stderr.startswith(
        "loratune: config error: training.lerning_rate: unknown setting"
    )
    missing = subprocess.run(
        [*command, "--configfile", str(tmp_path / "none.yaml")], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and missing.stderr.startswith("loratune: --configfile: no such file")
