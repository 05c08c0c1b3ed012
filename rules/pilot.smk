checkpoint sample_pilot:
    input:
        warm_start=get_warm_start_sources,
    output:
        proposals=f"{OUT}/seed{{seed}}/pilot/round0/proposals.tsv",
    log:
        f"{OUT}/logs/seed{{seed}}/pilot/sample_pilot.log",
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        trials=f"{OUT}/seed{{seed}}/trials",
    script:
        "../workflow/scripts/sample_pilot.py"
