from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import propose_round

propose_round(
    validate_config(snakemake.config),
    arm_name=snakemake.wildcards.arm,
    seed=int(snakemake.wildcards.seed),
    round_=int(snakemake.wildcards.round),
    history_path=snakemake.input.history,
    output=snakemake.output.proposals,
)
