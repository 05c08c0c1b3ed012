checkpoint sample_pilot:
    output:
        proposals=f"{OUT}/seed{{seed}}/pilot/round0/proposals.tsv",
    log:
        f"{OUT}/logs/seed{{seed}}/pilot/sample_pilot.log",
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../workflow/scripts/sample_pilot.py"
