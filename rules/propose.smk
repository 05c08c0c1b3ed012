checkpoint propose:
    input:
        history=get_previous_history,
        warm_start=get_warm_start_sources,
    output:
        proposals=f"{OUT}/seed{{seed}}/{{arm}}/round{{round}}/proposals.tsv",
    log:
        f"{OUT}/logs/seed{{seed}}/{{arm}}/propose_round{{round}}.log",
    benchmark:
        f"{OUT}/benchmarks/seed{{seed}}/{{arm}}/propose_round{{round}}.tsv"
    wildcard_constraints:
        arm="|".join(ARMS),
        round=r"[1-9]\d*",
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../workflow/scripts/propose.py"
