# Successive halving inside a round, for arms with early_stopping (see loratune/early_stopping.py).
# Rung k < last trains the round's surviving trials to step s_k (trials/<id>/step<s_k>/), the
# checkpoint promote picks who goes on; the last rung is the trial's ordinary full-budget
# metrics.json (train_trial), which continues from the state the rungs saved. Input functions:
# the early-stopping section of rules/common.smk.


rule train_rung:
    input:
        unpack(get_trial_inputs),
    output:
        metrics=f"{OUT}/seed{{seed}}/trials/{{trial}}/step{{step}}/metrics.json",
    log:
        f"{OUT}/seed{{seed}}/trials/{{trial}}/step{{step}}/train.log",
    benchmark:
        f"{OUT}/seed{{seed}}/trials/{{trial}}/step{{step}}/benchmark.tsv"
    wildcard_constraints:
        step=r"\d+",
    threads: TRIAL_THREADS
    resources:
        gpu=get_trial_gpus,
        gpu_share=get_trial_gpu_share,
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        cpus_per_task=config["resources"]["cpus_per_trial"],
    script:
        "../workflow/scripts/train_trial.py"


checkpoint promote:
    input:
        unpack(get_rung_inputs),
    output:
        promoted=f"{OUT}/seed{{seed}}/{{arm}}/round{{round}}/rung{{rung}}/promoted.tsv",
    log:
        f"{OUT}/logs/seed{{seed}}/{{arm}}/promote_round{{round}}_rung{{rung}}.log",
    wildcard_constraints:
        arm="|".join(ARMS),
        round=r"[1-9]\d*",
        rung=r"\d+",
    localrule: True
    script:
        "../workflow/scripts/promote.py"
