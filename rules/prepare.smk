# Runs on the head node: a hub model downloads from there (compute nodes are often offline).
rule prepare_model:
    output:
        marker=MODEL_MARKER,
    log:
        f"resources/logs/prepare_model/{STUDY.model_slug}.log",
    localrule: True
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=config["model"],
    script:
        "../workflow/scripts/prepare_model.py"


# Depends on the prepared model for its tokenizer: the data is checked once, as training renders
# it, against training.max_seq_length. ancient(): a model prepared after the data (they may run
# side by side) never re-prepares it, which would retrain every trial.
rule prepare_dataset:
    input:
        model=ancient(MODEL_MARKER),
    output:
        train=f"{OUT}/data/train.jsonl",
        eval=f"{OUT}/data/eval.jsonl",
        manifest=f"{OUT}/data/manifest.json",
    log:
        f"{OUT}/logs/prepare_dataset.log",
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dataset=config["dataset"],
        model=config["model"],
        training=config["training"],
    script:
        "../workflow/scripts/prepare_dataset.py"
