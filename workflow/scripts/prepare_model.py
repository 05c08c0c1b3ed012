from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from pathlib import Path

from loratune.files import atomic_write_json
from loratune.training import ModelSpec, prepare_model

spec = ModelSpec(**snakemake.params.model)
# The converted model lives beside its marker file, in the shared model cache.
with one_line_errors():
    path = prepare_model(spec, cache_dir=Path(snakemake.output.marker).parent)
atomic_write_json(snakemake.output.marker, {"name": spec.name, "path": str(path)})
