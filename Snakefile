# vlmquant: modality-balanced quantization of vision-language models.
# Edit config.yaml, then `snakemake --cores all`. See README.md.
from snakemake.utils import min_version

min_version("9.0")

import sys

from vlmquant.report.plan import final_table, plan_lines, planned_jobs
from vlmquant.workflow import check_yaml, config_errors, exit_if_stopped, watch
from vlmquant.workflow.jobserver import start as start_jobserver

# config.yaml, then each --configfile (rising precedence), and the --config values: where config errors point
CONFIG_FILES = ["config.yaml", *map(str, workflow.overwrite_configfiles)]
CONFIG_ARGS = workflow.config_settings.config

# a YAML syntax error with its line (Snakemake's own message has none); config errors end the run with
# their one line on stderr, without Snakemake's header and frames
with config_errors(CONFIG_FILES, CONFIG_ARGS):
    check_yaml("config.yaml")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/organism.smk"
include: "rules/calib.smk"
include: "rules/inputs.smk"
include: "rules/search.smk"
include: "rules/export.smk"
include: "rules/eval.smk"
include: "rules/summary.smk"


# Snakemake keeps one handler per hook, so every hook is here. Before running: per stage, the jobs with estimates
# of time and memory; after a run that made the summary: its main columns; on stderr, so both show with --quiet
# too (vlmquant/report/plan.py). SIGTERM: Snakemake finishes the running jobs, then reports a failure; say what
# was stopped instead (vlmquant/workflow/joblog.py). Local jobs run in forks of one process that imported torch and
# transformers once (vlmquant/workflow/jobserver.py).
PLANNED = []


onstart:
    watch()
    start_jobserver(workflow)
    PLANNED.extend(planned_jobs(workflow))
    print("\n".join(plan_lines(PLANNED)), file=sys.stderr)


onsuccess:
    table = (
        final_table(paths.SUMMARY_CSV)
        if any(j.rule == "summary" for j in PLANNED)
        else None
    )
    if table:
        print(
            f"{paths.SUMMARY_CSV} (every column; all runs so far: {paths.ALL_RUNS}):\n{table}",
            file=sys.stderr,
        )


onerror:
    exit_if_stopped(workflow.scheduler)


rule all:
    default_target: True
    input:
        W.targets(config),
