from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from pathlib import Path

from loratune.training import DatasetSpec, prepare_dataset

with one_line_errors():
    prepare_dataset(DatasetSpec(**snakemake.params.dataset), out_dir=Path(snakemake.output.manifest).parent)
