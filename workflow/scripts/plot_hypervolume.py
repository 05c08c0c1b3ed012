from loratune.logs import log_to_file

log_to_file(snakemake.log[0])

from loratune.loop import plot_hypervolume

plot_hypervolume(snakemake.input.curves, snakemake.output.html)
