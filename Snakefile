# vlmquant: modality-balanced quantization of vision-language models.
# Edit config.yaml, then `snakemake --cores all`. See README.md.
from snakemake.utils import min_version

min_version("9.0")

from vlmquant.workflow import check_yaml

# a YAML syntax error with its line (Snakemake's own message has none)
check_yaml("config.yaml")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/calib.smk"
include: "rules/inputs.smk"
include: "rules/search.smk"
include: "rules/export.smk"
include: "rules/eval.smk"
include: "rules/summary.smk"


rule all:
    default_target: True
    input:
        W.targets(config),
