rule train_trial:
    input:
        unpack(get_trial_inputs),
    output:
        metrics=f"{OUT}/seed{{seed}}/trials/{{trial}}/metrics.json",
    log:
        f"{OUT}/seed{{seed}}/trials/{{trial}}/train.log",
    benchmark:
        f"{OUT}/seed{{seed}}/trials/{{trial}}/benchmark.tsv"
    threads: TRIAL_THREADS
    resources:
        gpu=get_trial_gpus,
        gpu_share=get_trial_gpu_share,
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        cpus_per_task=config["resources"]["cpus_per_trial"],
    script:
        "../workflow/scripts/train_trial.py"
