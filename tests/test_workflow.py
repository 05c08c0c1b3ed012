"""The whole DAG on the benchmark backend: a real Snakemake run, resumption, dry-run, re-plotting."""

from __future__ import annotations

import copy
import csv
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, load_test_config, run_workflow, write_config

pytestmark = pytest.mark.slow

CONFIG = load_test_config("tiny_benchmark.yaml")
OUT = Path("results") / CONFIG["study"]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    configfile = write_config(workdir / "config.yaml", CONFIG)
    first = run_workflow(workdir, configfile)
    return workdir, configfile, first


def _metrics_mtimes(workdir: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (workdir / OUT).glob("seed*/trials/*/metrics.json")}


def test_study_produces_every_output(finished_study):
    workdir, _, first = finished_study
    out = workdir / OUT
    for name in ["trials.tsv", "hypervolume.tsv", "pareto_set.tsv", "report.html", "summary.txt",
                 "plots/pareto.html", "plots/hypervolume.html", "plots/pareto_set.html"]:
        assert (out / name).stat().st_size > 0, name
    for seed in CONFIG["seeds"]:
        for arm in ["pilot", "gptune", "random", "grid"]:
            assert (out / f"gptune_db/seed{seed}/{arm}.json").exists()
    assert "Pareto set of study 'tiny-benchmark'" in first.stdout + first.stderr
    assert "report.html" in first.stdout + first.stderr


def test_trials_table_has_every_round_of_every_arm(finished_study):
    workdir, _, _ = finished_study
    trials = pd.read_csv(workdir / OUT / "trials.tsv", sep="\t")
    expected = {"pilot": 4, "gptune": 4, "random": 4, "grid": 3}
    for seed in CONFIG["seeds"]:
        per_arm = trials[trials.seed == seed].groupby("arm").size().to_dict()
        assert per_arm == expected
    assert set(trials.status) == {"ok"}
    assert (trials.lora_rank % 4 == 0).all()
    assert set(trials.lora_alpha) <= {4, 8, 16, 32, 64, 128, 256}
    assert (trials.lora_dropout == 0.05).all()
    assert trials.train_loss.notna().all() and trials.train_time.notna().all()
    # An arm never trains one point twice within a seed.
    assert not trials.duplicated(["seed", "arm", "trial_id"]).any()
    rounds = trials[trials.arm == "gptune"].groupby("seed")["round"].agg(set)
    assert all(r == {1, 2} for r in rounds)


def test_second_run_finds_nothing_to_do(finished_study):
    workdir, configfile, _ = finished_study
    before = _metrics_mtimes(workdir)
    again = run_workflow(workdir, configfile)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert _metrics_mtimes(workdir) == before


def test_replotting_retrains_nothing(finished_study):
    workdir, configfile, _ = finished_study
    before = _metrics_mtimes(workdir)
    pareto = workdir / OUT / "plots/pareto.html"
    old = pareto.stat().st_mtime_ns
    result = run_workflow(workdir, configfile, "-R", "plot_pareto")
    log = result.stdout + result.stderr
    assert "plot_pareto" in log and "train_trial" not in log and "propose" not in log
    assert pareto.stat().st_mtime_ns > old
    assert _metrics_mtimes(workdir) == before


def test_dry_run_lists_the_pending_trials_of_a_round(tmp_path):
    configfile = write_config(tmp_path / "config.yaml", CONFIG)
    pilot = OUT / "seed0/pilot/round0/proposals.tsv"
    run_workflow(tmp_path, configfile, str(pilot))
    with open(tmp_path / pilot) as handle:
        trial_ids = [row["trial_id"] for row in csv.DictReader(handle, delimiter="\t")]
    assert len(trial_ids) == CONFIG["pilot"]["n"]
    dry = run_workflow(tmp_path, configfile, "-n")
    log = dry.stdout + dry.stderr
    for trial_id in trial_ids:
        assert f"trial={trial_id}" in log
    assert not list((tmp_path / OUT).glob("seed*/trials/*/metrics.json"))


BAD_CONFIGS = [
    ("arms.gptune.proposer", lambda c: c["arms"]["gptune"].update(proposer="bayes")),
    ("arms.gptune.options: proposer.gptune.population_size",
     lambda c: c["arms"]["gptune"].update(options={"population_size": 0})),
    ("arms.random.options: proposer.random: unknown option 'sampler'",
     lambda c: c["arms"]["random"].update(options={"sampler": "tpe"})),
    ("search_space.lora_rank", lambda c: c["search_space"]["lora_rank"].update(low=300)),
    ("search_space.lora_rank.step", lambda c: c["search_space"]["lora_rank"].update(step=5)),
    ("objectives", lambda c: c.update(objectives={})),
    ("objectives.eval_los", lambda c: c.update(backend="qlora", objectives={"eval_los": "min"})),
    ("pilot.design", lambda c: c["pilot"].update(design="sobol")),
    ("benchmark.problem", lambda c: c["benchmark"].update(problem="zdt9")),
    ("model.name", lambda c: c.update(backend="qlora", objectives={"eval_loss": "min"},
                                      model={"name": "/nowhere/model.gguf"})),
    ("dataset.path", lambda c: c.update(backend="qlora", objectives={"eval_loss": "min"},
                                        dataset={"path": "missing.jsonl"})),
    ("training.quantization", lambda c: c.update(backend="qlora", objectives={"eval_loss": "min"},
                                                 training={"quantization": "int3"})),
    ("search_space", lambda c: c.update(backend="qlora", objectives={"eval_loss": "min"},
                                        search_space={"lora_rank": {"type": "int", "low": 4, "high": 8}})),
]


@pytest.mark.parametrize("field, corrupt", BAD_CONFIGS, ids=[f for f, _ in BAD_CONFIGS])
def test_bad_config_fails_before_any_job_with_one_line(tmp_path, field, corrupt):
    config = copy.deepcopy(CONFIG)
    corrupt(config)
    configfile = write_config(tmp_path / "config.yaml", config)
    result = run_workflow(tmp_path, configfile, "-n", check=False)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).splitlines()
    lines = [line for line in output if line.strip() and not line.startswith("Using profile")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"loratune: config error: {field}"), lines[0]
    assert not (tmp_path / "results").exists()


# The rules have no conda: or container: directive on purpose (README, "Using it": GPTune's flat
# sdist needs the pip environment), so this is the one lint a rule may get.
NO_SOFTWARE_LINT = "Specify a conda environment or container for each rule."


def test_lint_and_format():
    lint = subprocess.run([SNAKEMAKE, "--lint", "-s", str(REPO / "Snakefile")], cwd=REPO,
                          capture_output=True, text=True)
    report = lint.stdout + lint.stderr
    lints = [line.strip()[2:].rstrip(":") for line in report.splitlines() if line.startswith("    * ")]
    assert lint.returncode == 0 or (lints and set(lints) == {NO_SOFTWARE_LINT}), report
    snakefmt = str(Path(SNAKEMAKE).with_name("snakefmt"))
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]
    fmt = subprocess.run([snakefmt, "--check", *files], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_snakemake_report_embeds_the_plots(finished_study):
    import zipfile

    workdir, configfile, _ = finished_study
    run_workflow(workdir, configfile, "--report", "report.zip")
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
    # The self-contained report.html (plotly.js and every figure inside) stands for the plots.
    assert any(name.endswith("report.html") for name in names), names
