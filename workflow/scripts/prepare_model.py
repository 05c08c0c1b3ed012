from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.ledger import atomic_write_json
from loratune.training import ModelSpec, prepare_model

spec = ModelSpec(**snakemake.params.model)
path = prepare_model(spec, cache_dir=snakemake.params.cache_dir)
atomic_write_json(snakemake.output.marker, {"name": spec.name, "path": str(path)})
