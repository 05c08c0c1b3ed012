from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import write_report

write_report(
    validate_config(snakemake.config),
    trials_path=snakemake.input.trials,
    curves_path=snakemake.input.curves,
    pareto_path=snakemake.input.pareto,
    importance_path=snakemake.input.importance,
    learning_curves_path=snakemake.input.learning_curves,
    output=snakemake.output.html,
)
