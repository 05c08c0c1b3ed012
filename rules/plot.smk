rule plot_pareto:
    input:
        trials=f"{OUT}/trials.tsv",
    output:
        html=report(
            f"{OUT}/plots/pareto.html",
            caption="../workflow/report/pareto.rst",
            category="Pareto fronts",
        ),
    log:
        f"{OUT}/logs/plot_pareto.log",
    localrule: True
    script:
        "../workflow/scripts/plot_pareto.py"


rule plot_hypervolume:
    input:
        curves=f"{OUT}/hypervolume.tsv",
    output:
        html=report(
            f"{OUT}/plots/hypervolume.html",
            caption="../workflow/report/hypervolume.rst",
            category="Search efficiency",
        ),
    log:
        f"{OUT}/logs/plot_hypervolume.log",
    localrule: True
    script:
        "../workflow/scripts/plot_hypervolume.py"


rule plot_pareto_set:
    input:
        trials=f"{OUT}/trials.tsv",
    output:
        html=report(
            f"{OUT}/plots/pareto_set.html",
            caption="../workflow/report/pareto_set.rst",
            category="Pareto fronts",
        ),
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
        figures=[
            f"{OUT}/plots/{name}.html"
            for name in ("pareto", "hypervolume", "pareto_set")
        ],
    output:
        html=f"{OUT}/report.html",
    log:
        f"{OUT}/logs/write_report.log",
    localrule: True
    script:
        "../workflow/scripts/write_report.py"


onsuccess:
    summary = Path(f"{OUT}/summary.txt")
    if summary.exists():
        print(summary.read_text())
