rule aggregate_trials:
    input:
        histories=get_final_histories(),
    output:
        trials=report(
            f"{OUT}/trials.tsv",
            caption="../workflow/report/trials.rst",
            category="Tables",
        ),
        hypervolume=f"{OUT}/hypervolume.tsv",
        pareto=f"{OUT}/pareto_set.tsv",
        curves=f"{OUT}/curves.tsv",
    log:
        f"{OUT}/logs/aggregate_trials.log",
    localrule: True
    script:
        "../workflow/scripts/aggregate_trials.py"


rule compute_importance:
    input:
        trials=f"{OUT}/trials.tsv",
    output:
        importance=f"{OUT}/importance.tsv",
    log:
        f"{OUT}/logs/compute_importance.log",
    localrule: True
    script:
        "../workflow/scripts/compute_importance.py"


rule export_gptune_db:
    input:
        history=get_final_history,
    output:
        database=f"{OUT}/gptune_db/seed{{seed}}/{{arm}}.json",
    log:
        f"{OUT}/logs/seed{{seed}}/{{arm}}/export_gptune_db.log",
    localrule: True
    script:
        "../workflow/scripts/export_gptune_db.py"
