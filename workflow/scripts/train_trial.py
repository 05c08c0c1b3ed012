from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from pathlib import Path

from loratune.config import validate_config
from loratune.training.models import read_model_marker
from loratune.trial import run_trial_job

rung = "step" in snakemake.wildcards.keys()
model_path = read_model_marker(snakemake.input.model) if "model" in snakemake.input.keys() else None

with one_line_errors():
    run_trial_job(
        validate_config(snakemake.config),
        trial_id=snakemake.wildcards.trial,
        seed=int(snakemake.wildcards.seed),
        metrics_path=snakemake.output.metrics,
        model_path=model_path,
        data_dir=str(Path(snakemake.input.data).parent) if "data" in snakemake.input.keys() else None,
        runtime_minutes=snakemake.resources.get("runtime"),
        # train_rung (rules/early_stopping.smk): train to the rung's step, state in the trial's folder.
        until_step=int(snakemake.wildcards.step) if rung else None,
        trial_dir=Path(snakemake.output.metrics).parent.parent if rung else None,
        log_path=snakemake.log[0],
    )
