# ccalign: CCA fine-tuning of LlamaGen and VAR, from raw images to a results table.
#   snakemake --profile workflow/profiles/local                      # embedded default, this machine
#   snakemake --profile workflow/profiles/slurm --configfile config/paper.yaml   # ImageNet on Slurm
# The config is read by ccalign.config (--configfile, several merged in order; --config overrides reach every
# job); the default is config/config.yaml.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    """Every target of the config (the paper config: every table and figure of the paper)."""
    input:
        targets("report"),


rule paper:
    """Every table and figure: the same as all."""
    input:
        targets("report"),
