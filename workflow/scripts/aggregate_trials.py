from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import aggregate

aggregate(
    validate_config(snakemake.config),
    history_paths=snakemake.input.histories,
    trials_output=snakemake.output.trials,
    hypervolume_output=snakemake.output.hypervolume,
    pareto_output=snakemake.output.pareto,
    curves_output=snakemake.output.curves,
)
