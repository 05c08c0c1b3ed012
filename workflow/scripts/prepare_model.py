from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from pathlib import Path

from loratune.training import ModelSpec, prepare_model
from loratune.training.models import write_model_marker

spec = ModelSpec(**snakemake.params.model)
# The converted model lives beside its marker file, in the shared model cache.
with one_line_errors():
    path = prepare_model(spec, cache_dir=Path(snakemake.output.marker).parent)
write_model_marker(snakemake.output.marker, spec, path)
