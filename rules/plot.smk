rule plot_pareto:
    input:
        trials=f"{OUT}/trials.tsv",
    output:
        html=f"{OUT}/plots/pareto.html",
    log:
        f"{OUT}/logs/plot_pareto.log",
    localrule: True
    script:
        "../workflow/scripts/plot_pareto.py"


rule plot_hypervolume:
    input:
        curves=f"{OUT}/hypervolume.tsv",
    output:
        html=f"{OUT}/plots/hypervolume.html",
    log:
        f"{OUT}/logs/plot_hypervolume.log",
    localrule: True
    script:
        "../workflow/scripts/plot_hypervolume.py"


rule plot_pareto_set:
    input:
        trials=f"{OUT}/trials.tsv",
    output:
        html=f"{OUT}/plots/pareto_set.html",
    log:
        f"{OUT}/logs/plot_pareto_set.log",
    localrule: True
    script:
        "../workflow/scripts/plot_pareto_set.py"


rule write_report:
    input:
        trials=f"{OUT}/trials.tsv",
        curves=f"{OUT}/hypervolume.tsv",
        pareto=f"{OUT}/pareto_set.tsv",
        importance=f"{OUT}/importance.tsv",
        learning_curves=f"{OUT}/curves.tsv",
        figures=[
            f"{OUT}/plots/{name}.html"
            for name in ("pareto", "hypervolume", "pareto_set")
        ],
    output:
        # The plots/*.html share plots/plotly.min.js, which a Snakemake report cannot hold beside
        # them; report.html embeds plotly.js and every figure, so it is the one the report shows.
        html=report(
            f"{OUT}/report.html",
            caption="../workflow/report/report.rst",
            category="Report",
        ),
    log:
        f"{OUT}/logs/write_report.log",
    localrule: True
    script:
        "../workflow/scripts/write_report.py"


# A run's end ends this user's idle trial workers (loratune.trial.retire_idle_workers).
onsuccess:
    from loratune.trial import retire_idle_workers

    retire_idle_workers()
    summary = Path(f"{OUT}/summary.txt")
    if summary.exists():
        print(summary.read_text())


onerror:
    from loratune.trial import retire_idle_workers

    retire_idle_workers()
