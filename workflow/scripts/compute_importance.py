from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import importance

importance(validate_config(snakemake.config), snakemake.input.trials, snakemake.output.importance)
