# Task metrics of a trained adapter (lm-eval), in a job of its own after training: re-running it
# (`-R evaluate_trial`, or new evaluation settings) retrains nothing. A record is the trial's
# metrics.json or, for a trial that early stopping stopped, its rung's step<k>/metrics.json.
rule evaluate_trial:
    input:
        unpack(get_trial_inputs),
        metrics=f"{OUT}/seed{{seed}}/trials/{{record}}/metrics.json",
        tasks=TASK_CONFIG,
    output:
        evaluation=f"{OUT}/seed{{seed}}/trials/{{record}}/evaluation.json",
    log:
        f"{OUT}/seed{{seed}}/trials/{{record}}/evaluate.log",
    benchmark:
        f"{OUT}/seed{{seed}}/trials/{{record}}/evaluate_benchmark.tsv"
    threads: TRIAL_THREADS
    resources:
        gpu=get_trial_gpus,
        gpu_share=get_exclusive_gpu_share,
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        cpus_per_task=config["resources"]["cpus_per_trial"],
    params:
        evaluation=config["evaluation"],
        device=config["training"].get("device", "auto"),
    script:
        "../workflow/scripts/evaluate_trial.py"
