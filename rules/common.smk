import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from loratune.config import ARM_NAME_PATTERN, ConfigError, validate_config
from loratune.ledger import PILOT, proposed_trial_ids, read_table
from loratune.loop import rung_candidates
from loratune import devices, study_state
from loratune.packing import gpu_job_share
from loratune.training.models import read_model_marker

# Switches of one run, not part of the study (given as --config recompute=true, retry_failed=...).
RECOMPUTE = str(config.pop("recompute", False)).lower() in ("true", "yes", "1")
RETRY_FAILED = config.pop("retry_failed", None)

try:
    STUDY = validate_config(config)
except ConfigError as error:
    sys.exit(f"loratune: config error: {error}")

OUT = f"{config['results_dir']}/{STUDY.name}"

# Before any job: a head inside a Slurm allocation (profiles/wave/study.sbatch) marks it, so
# that its jobs share the allocation's GPUs out as a workstation's (loratune/devices.py); one head
# per study, and the study folder reconciled with this config (changed config, lost or corrupt
# files, failed trials to retry): see loratune/study_state.py.
if workflow.is_main_process:
    devices.mark_allocation_head()
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
# The evaluation settings as a file: rewritten (newer) only when they change, so that changing
# the tasks re-runs evaluate_trial, and only it, under the mtime rerun trigger.
TASK_CONFIG = f"{OUT}/evaluation/task_config.json"
if STUDY.evaluates:
    from loratune.evaluation.tasks import sync_task_config

    sync_task_config(TASK_CONFIG, config["evaluation"])


wildcard_constraints:
    seed=r"\d+",
    round=r"\d+",
    arm="|".join([PILOT, *ARMS]),
    trial=STUDY.space.trial_id_pattern,
    # A trial record's folder under trials/: the trial's, or a rung's (step<k>) where it stopped.
    record=rf"(?:{STUDY.space.trial_id_pattern})(?:/step\d+)?",


def get_previous_history(wildcards):
    """History an arm's round sees: the pilot's for round 1, else its own previous round's."""
    if wildcards.arm == PILOT:
        return []
    previous = int(wildcards.round) - 1
    arm = PILOT if previous == 0 else wildcards.arm
    return f"{OUT}/seed{wildcards.seed}/{arm}/round{previous}/history.tsv"


def get_warm_start_sources(wildcards):
    """The warm_start files: the pilot records their same-setting trials, and every round's
    proposer fits their related-task rows (loratune/warm_start.py)."""
    return [entry["path"] for entry in config["warm_start"]]


def get_round_metrics(wildcards):
    """metrics.json of every trial the round proposed (known once its checkpoint has run)."""
    if uses_early_stopping(wildcards.arm):  # rules/early_stopping.smk
        return get_rung_round_metrics(wildcards)
    step = checkpoints.sample_pilot if wildcards.arm == PILOT else checkpoints.propose
    proposals = step.get(**wildcards).output.proposals
    return [
        f"{OUT}/seed{wildcards.seed}/trials/{t}/metrics.json"
        for t in proposed_trial_ids(proposals)
    ]


def get_round_evaluations(wildcards):
    """evaluation.json beside each record of the round (a stopped trial's at its rung), when
    objectives or tasks ask for lm-eval metrics."""
    if not STUDY.evaluates:
        return []
    return [
        str(Path(path).with_name("evaluation.json"))
        for path in get_round_metrics(wildcards)
    ]


def get_trial_inputs(wildcards):
    """The prepared model and dataset a real trial trains on; nothing for a benchmark trial."""
    if config["backend"] != "qlora":
        return {}
    return {"model": MODEL_MARKER, "data": f"{OUT}/data/manifest.json"}


def get_trial_gpus(wildcards):
    return config["resources"]["gpus_per_trial"] if config["backend"] == "qlora" else 0


# A trial job's threads (Snakemake exports them as OMP_NUM_THREADS): see devices.trial_threads.
TRIAL_THREADS = devices.trial_threads(config)


def get_prepared_model_path(input):
    """The prepared model's folder, or None before prepare_model has run (a dry run)."""
    return read_model_marker(input.model) if "model" in input.keys() else None


def get_trial_gpu_share(wildcards, input):
    """The trial job's part of this machine's GPUs (`gpu_share`, capped by profiles/local)."""
    return gpu_job_share(config, get_prepared_model_path(input))


def get_exclusive_gpu_share(wildcards, input):
    """A GPU job that takes its GPU alone (evaluate_trial): one GPU's part of `gpu_share`."""
    return gpu_job_share(config, None, exclusive=True)


def get_final_histories(wildcards=None):
    """Each arm's history after its last round (the pilot's where an arm has no rounds)."""
    paths = []
    for seed in STUDY.seeds:
        paths.append(f"{OUT}/seed{seed}/{PILOT}/round0/history.tsv")
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
        for arm in [PILOT, *[a.name for a in STUDY.arms if a.rounds > 0]]
    ]


def get_final_history(wildcards):
    rounds = 0 if wildcards.arm == PILOT else STUDY.arm(wildcards.arm).rounds
    return f"{OUT}/seed{wildcards.seed}/{wildcards.arm}/round{rounds}/history.tsv"


def get_final_outputs():
    return [
        f"{OUT}/trials.tsv",
        f"{OUT}/report.html",
        *get_gptune_databases(),
    ]


# ---- early stopping: input functions of rules/early_stopping.smk -----------------------


def uses_early_stopping(arm):
    """Whether an arm stops trials at rungs (a single rung [1.0] is an ordinary arm)."""
    if arm == PILOT:
        return False
    schedule = STUDY.arm(arm).early_stopping
    return schedule is not None and len(schedule.rungs) > 1


def get_rung_inputs(wildcards):
    """The proposals, the previous rung's promoted.tsv and the metrics (and evaluations) at
    this rung's step."""
    proposals = checkpoints.propose.get(
        seed=wildcards.seed, arm=wildcards.arm, round=wildcards.round
    ).output.proposals
    rung = int(wildcards.rung)
    previous = []
    if rung > 0:
        previous = checkpoints.promote.get(
            **{**wildcards, "rung": str(rung - 1)}
        ).output.promoted
    step = STUDY.rung_steps(wildcards.arm)[rung]
    records = [
        f"{OUT}/seed{wildcards.seed}/trials/{t}/step{step}"
        for t in rung_candidates(proposals, previous or None)
    ]
    return {
        "proposals": proposals,
        "previous": previous,
        "metrics": [f"{record}/metrics.json" for record in records],
        # lm-eval objectives are measured at the rung too: promotion judges them all.
        "evaluations": [f"{record}/evaluation.json" for record in records]
        * STUDY.evaluates,
    }


def get_last_promotion(wildcards):
    """The round's last promoted.tsv: every trial at the highest rung it reached."""
    last = len(STUDY.arm(wildcards.arm).early_stopping.rungs) - 2
    return checkpoints.promote.get(**{**wildcards, "rung": str(last)}).output.promoted


def get_round_outcomes(wildcards):
    return get_last_promotion(wildcards) if uses_early_stopping(wildcards.arm) else []


def get_rung_round_metrics(wildcards):
    """metrics.json of each trial of the round at its highest rung: the full-budget one for
    trials promoted past the last rung, the rung's for stopped ones."""
    outcomes = read_table(get_last_promotion(wildcards))
    steps = STUDY.rung_steps(wildcards.arm)
    paths = []
    for row in outcomes.itertuples(index=False):
        trial = f"{OUT}/seed{wildcards.seed}/trials/{row.trial_id}"
        reached_last = row.promoted and row.rung == len(steps) - 2
        paths.append(
            f"{trial}/metrics.json"
            if reached_last
            else f"{trial}/step{row.step}/metrics.json"
        )
    return paths
