"""The ``loratune`` command: what a study's files say about it, without running Snakemake.

``loratune schema`` prints the config schema as the workflow validates with it (the
``model``, ``dataset`` and ``training`` fields generated from their dataclasses).

``loratune status [--configfile X] [-d WORKDIR]`` reads the config as the workflow does, then
the study's files under ``WORKDIR/<results_dir>/<study>/`` (the layout in ARCHITECTURE.md): each
round's ``proposals.tsv`` names its trials, each trial's ``metrics.json`` its outcome. A trial
without metrics is pending; a round without proposals has not been proposed yet.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from loratune.config import ConfigError, Study, load_config, load_schema
from loratune.ledger import PILOT, proposed_trial_ids, read_metrics

__all__ = ["STATUS_COLUMNS", "main", "study_status", "format_status"]

# Trial outcomes a metrics.json records (a missing status means ok), then the trials without one.
OUTCOMES = ("ok", "failed", "stopped")
STATUS_COLUMNS = ("seed", "arm", "round", "proposed", *OUTCOMES, "pending")


def _rounds(study: Study) -> list[tuple[str, int]]:
    return [(PILOT, 0)] + [(arm.name, r) for arm in study.arms for r in range(1, arm.rounds + 1)]


def _outcome(metrics: Path) -> str:
    if not metrics.exists():
        return "pending"
    return read_metrics(metrics).get("status") or "ok"


def study_status(study: Study, study_dir: str | Path) -> pd.DataFrame:
    """One row per seed, arm and round: trials proposed, each outcome, pending. A round not
    proposed yet has ``proposed`` missing (NA) and no counts."""
    study_dir = Path(study_dir)
    rows = []
    for seed in study.seeds:
        for arm, round_ in _rounds(study):
            proposals = study_dir / f"seed{seed}" / arm / f"round{round_}" / "proposals.tsv"
            row = {"seed": seed, "arm": arm, "round": round_}
            if not proposals.exists():
                rows.append({**row, "proposed": pd.NA, **{c: 0 for c in (*OUTCOMES, "pending")}})
                continue
            trial_ids = proposed_trial_ids(proposals)
            counts = Counter(_outcome(study_dir / f"seed{seed}" / "trials" / t / "metrics.json") for t in trial_ids)
            unknown = set(counts) - {*OUTCOMES, "pending"}
            if unknown:
                raise ValueError(f"{proposals}: trial status {sorted(unknown)} is none of {list(OUTCOMES)}")
            rows.append({**row, "proposed": len(trial_ids), **{c: counts[c] for c in (*OUTCOMES, "pending")}})
    table = pd.DataFrame(rows, columns=list(STATUS_COLUMNS))
    table["proposed"] = table["proposed"].astype("Int64")
    return table


def format_status(study: Study, table: pd.DataFrame) -> str:
    """The table as text, ``-`` for a round not proposed yet, with a totals line."""
    shown = table.astype(object).where(table.notna(), "-")
    not_proposed = int(table["proposed"].isna().sum())
    totals = ", ".join(f"{table[c].sum()} {c}" for c in (*OUTCOMES, "pending"))
    lines = [
        f"study {study.name}: {len(study.seeds)} seed(s), arms {[a.name for a in study.arms]}",
        shown.to_string(index=False),
        f"trials: {totals}; rounds not proposed yet: {not_proposed}",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratune", description="A study's state and its config schema, without running Snakemake."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="trials done, pending, failed, stopped per seed, arm and round")
    status.add_argument("--configfile", default="config/config.yaml", help="the study's config (as for snakemake)")
    status.add_argument("-d", "--directory", default=".", help="the working directory the workflow ran in")
    commands.add_parser("schema", help="print the config schema: every field with its type, default and description")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "schema":
        sys.stdout.write(yaml.safe_dump(load_schema(), sort_keys=False, width=100))
        return 0
    if not Path(arguments.configfile).is_file():
        print(f"loratune: --configfile: no such file: {arguments.configfile}", file=sys.stderr)
        return 2
    try:
        study = load_config(arguments.configfile)
    except ConfigError as error:
        print(f"loratune: config error: {error}", file=sys.stderr)
        return 2
    study_dir = Path(arguments.directory) / study.config["results_dir"] / study.name
    try:
        table = study_status(study, study_dir)
    except ValueError as error:
        print(f"loratune: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(format_status(study, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
