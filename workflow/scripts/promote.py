from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import promote_rung

promote_rung(
    validate_config(snakemake.config),
    arm_name=snakemake.wildcards.arm,
    rung=int(snakemake.wildcards.rung),
    proposals_path=snakemake.input.proposals,
    previous_path=snakemake.input.previous or None,
    metrics_paths=snakemake.input.metrics,
    evaluation_paths=snakemake.input.evaluations,
    output=snakemake.output.promoted,
)
