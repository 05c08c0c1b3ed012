from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import plot_pareto_set

plot_pareto_set(validate_config(snakemake.config), snakemake.input.trials, snakemake.output.html)
