rule update_history:
    input:
        proposals=f"{OUT}/seed{{seed}}/{{arm}}/round{{round}}/proposals.tsv",
        previous=get_previous_history,
        metrics=get_round_metrics,
        outcomes=get_round_outcomes,
        evaluations=get_round_evaluations,
    output:
        history=f"{OUT}/seed{{seed}}/{{arm}}/round{{round}}/history.tsv",
    log:
        f"{OUT}/logs/seed{{seed}}/{{arm}}/update_history_round{{round}}.log",
    localrule: True
    script:
        "../workflow/scripts/update_history.py"
