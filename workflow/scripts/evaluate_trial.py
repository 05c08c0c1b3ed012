from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

import json
import os
from pathlib import Path

from loratune.evaluation.harness import OFFLINE_ENVIRONMENT, evaluate_trial

# Offline before lm-eval, datasets or transformers is imported: they read these at import.
os.environ.update(OFFLINE_ENVIRONMENT)

with open(snakemake.input.model) as handle:
    model_path = json.load(handle)["path"]

evaluate_trial(
    metrics_path=snakemake.input.metrics,
    model_path=model_path,
    data_dir=str(Path(snakemake.input.data).parent),
    evaluation=snakemake.params.evaluation,
    output=snakemake.output.evaluation,
    device=snakemake.params.device,
    gpus=int(snakemake.resources.gpu),
)
