from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.config import validate_config
from loratune.loop import export_gptune_db

export_gptune_db(
    validate_config(snakemake.config),
    history_path=snakemake.input.history,
    output=snakemake.output.database,
    arm=snakemake.wildcards.arm,
    seed=int(snakemake.wildcards.seed),
)
