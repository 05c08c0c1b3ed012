from loratune.logs import log_to_file, one_line_errors

log_to_file(snakemake.log[0])

from loratune.loop import update_history

with one_line_errors():
    update_history(
        previous_path=snakemake.input.previous or None,
        proposals_path=snakemake.input.proposals,
        metrics_paths=snakemake.input.metrics,
        evaluation_paths=snakemake.input.evaluations,
        objectives=snakemake.config["objectives"],
        output=snakemake.output.history,
        outcomes_path=snakemake.input.outcomes or None,
    )
