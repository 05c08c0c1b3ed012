from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from pathlib import Path

from loratune.training import DatasetSpec, TrainingSettings, prepare_dataset
from loratune.training.data import check_fits, read_prepared
from loratune.training.models import load_tokenizer, read_model_marker

out_dir = Path(snakemake.output.manifest).parent
model_path = read_model_marker(snakemake.input.model)
model = snakemake.params.model

with one_line_errors():
    prepare_dataset(DatasetSpec(**snakemake.params.dataset), out_dir=out_dir)
    tokenizer = load_tokenizer(
        model_path, revision=model.get("revision"), trust_remote_code=model.get("trust_remote_code", False)
    )
    check_fits(tokenizer, read_prepared(out_dir), TrainingSettings(**snakemake.params.training).max_seq_length)
