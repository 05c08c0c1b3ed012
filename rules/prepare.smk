rule prepare_model:
    output:
        marker=MODEL_MARKER,
    log:
        "logs/prepare_model/" + Path(MODEL_MARKER).stem + ".log",
    params:
        model=config["model"],
        cache_dir="resources/models",
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../workflow/scripts/prepare_model.py"


rule prepare_dataset:
    output:
        train=f"{OUT}/data/train.jsonl",
        eval=f"{OUT}/data/eval.jsonl",
        manifest=f"{OUT}/data/manifest.json",
    log:
        f"{OUT}/logs/prepare_dataset.log",
    params:
        dataset=config["dataset"],
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../workflow/scripts/prepare_dataset.py"
