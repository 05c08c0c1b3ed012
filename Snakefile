# loratune: multi-objective search for LoRA/QLoRA hyperparameters.
# The loop: pilot (round 0) -> per arm: propose -> train trials -> update history, round by round
# -> aggregate -> Pareto plots and report. See ARCHITECTURE.md.
from snakemake.utils import min_version

min_version("9.21")


# A study given with --configfile stands alone: merging it into the default study would add
# the default's arms and search-space parameters to it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/pilot.smk"
include: "rules/propose.smk"
include: "rules/train.smk"
include: "rules/early_stopping.smk"
include: "rules/evaluate.smk"
include: "rules/history.smk"
include: "rules/aggregate.smk"
include: "rules/plot.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
