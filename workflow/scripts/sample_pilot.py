from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import sample_pilot

sample_pilot(
    validate_config(snakemake.config),
    seed=int(snakemake.wildcards.seed),
    output=snakemake.output.proposals,
    trials_dir=snakemake.params.trials,
)
