import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from loratune.config import ARM_NAME_PATTERN, ConfigError, validate_config
from loratune import study_state

# Switches of one run, not part of the study (given as --config recompute=true, retry_failed=...).
RECOMPUTE = str(config.pop("recompute", False)).lower() in ("true", "yes", "1")
RETRY_FAILED = config.pop("retry_failed", None)

try:
    STUDY = validate_config(config)
except ConfigError as error:
    sys.exit(f"loratune: config error: {error}")

OUT = f"{config['results_dir']}/{STUDY.name}"

# Before any job: one head per study, and the study folder reconciled with this config
# (changed config, lost or corrupt files, failed trials to retry): see loratune/study_state.py.
if workflow.is_main_process:
    LOOKING = study_state.only_looks(sys.argv)
    if not LOOKING:
        try:
            HEAD_LOCK = study_state.hold_lock(
                f"{OUT}/{study_state.HEAD_LOCK}", wait=False
            )
        except BlockingIOError as error:
            sys.exit(
                f"loratune: study {STUDY.name!r} is being run by another head ({error}); wait for it or stop it"
            )
    try:
        for line in study_state.prepare_run(
            STUDY, OUT, recompute=RECOMPUTE, retry_failed=RETRY_FAILED, dry_run=LOOKING
        ):
            print(f"loratune: {line}", file=sys.stderr)
    except study_state.StudyStateError as error:
        sys.exit(f"loratune: {error}")
ARMS = [arm.name for arm in STUDY.arms]
MODEL_MARKER = f"resources/models/{STUDY.model_slug}.json"


wildcard_constraints:
    seed=r"\d+",
    round=r"\d+",
    arm="|".join(["pilot", *ARMS]),
    trial=STUDY.space.trial_id_pattern,


def get_previous_history(wildcards):
    """History an arm's round sees: the pilot's for round 1, else its own previous round's."""
    if wildcards.arm == "pilot":
        return []
    previous = int(wildcards.round) - 1
    arm = "pilot" if previous == 0 else wildcards.arm
    return f"{OUT}/seed{wildcards.seed}/{arm}/round{previous}/history.tsv"


def get_round_metrics(wildcards):
    """metrics.json of every trial the round proposed (known once its checkpoint has run)."""
    step = checkpoints.sample_pilot if wildcards.arm == "pilot" else checkpoints.propose
    proposals = step.get(**wildcards).output.proposals
    with open(proposals) as handle:
        trial_ids = [row["trial_id"] for row in csv.DictReader(handle, delimiter="\t")]
    return [f"{OUT}/seed{wildcards.seed}/trials/{t}/metrics.json" for t in trial_ids]


def get_trial_inputs(wildcards):
    """The prepared model and dataset a real trial trains on; nothing for a benchmark trial."""
    if config["backend"] != "qlora":
        return {}
    return {"model": MODEL_MARKER, "data": f"{OUT}/data/manifest.json"}


def get_trial_gpus(wildcards):
    return config["resources"]["gpus_per_trial"] if config["backend"] == "qlora" else 0


def get_final_histories(wildcards=None):
    """Each arm's history after its last round (the pilot's where an arm has no rounds)."""
    paths = []
    for seed in STUDY.seeds:
        paths.append(f"{OUT}/seed{seed}/pilot/round0/history.tsv")
        for arm in STUDY.arms:
            if arm.rounds > 0:
                paths.append(
                    f"{OUT}/seed{seed}/{arm.name}/round{arm.rounds}/history.tsv"
                )
    return paths


def get_gptune_databases(wildcards=None):
    return [
        f"{OUT}/gptune_db/seed{seed}/{arm}.json"
        for seed in STUDY.seeds
        for arm in ["pilot", *[a.name for a in STUDY.arms if a.rounds > 0]]
    ]


def get_final_history(wildcards):
    rounds = 0 if wildcards.arm == "pilot" else STUDY.arm(wildcards.arm).rounds
    return f"{OUT}/seed{wildcards.seed}/{wildcards.arm}/round{rounds}/history.tsv"


def get_final_outputs():
    return [
        f"{OUT}/trials.tsv",
        f"{OUT}/report.html",
        *get_gptune_databases(),
    ]
