from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

import json
from pathlib import Path

from loratune.evaluation.harness import evaluate_trial

with open(snakemake.input.model) as handle:
    model_path = json.load(handle)["path"]

evaluate_trial(
    metrics_path=snakemake.input.metrics,
    model_path=model_path,
    data_dir=str(Path(snakemake.input.data).parent),
    evaluation=snakemake.params.evaluation,
    output=snakemake.output.evaluation,
    device=snakemake.params.device,
)
