"""Glue between Snakemake and the library, one module per concern: config checks (checks), targets and the
files each job reads (inputs), scheduler resources (resources), the jobs' logging and a stopped run's report
(joblog). The Snakefile and rules/common.smk use it as `from vlmquant import workflow as W`; the names they,
the scripts and the tests use are re-exported here.

Everything here is a function of the validated config and the files it names. Module-level imports are light
(the scripts import script_logging before anything else); the run specs and their methods are imported where
used."""
from vlmquant.workflow.checks import (check_calib_sets, check_config, check_models, check_yaml, config_errors,
                                      print_notes, quantized_widths)
from vlmquant.workflow.inputs import (CHECKPOINTS, FIGURES, calib_fingerprints, calib_params, calib_sources,
                                      chunk_folders, chunk_layers, chunks, eval_settings, evaluated_checkpoint,
                                      fill, lmms_eval_command, model_files, model_fingerprints, name_pattern,
                                      other_tables, plot_runs, run_specs, search_runs, search_start,
                                      source_fingerprints, summary_rows, target_triples, targets)
from vlmquant.workflow.joblog import exit_if_stopped, job_label, script_logging, watch
from vlmquant.workflow.resources import BASE_MB, gpus_per_job, job_mem_mb, lmms_gpus, model_params

__all__ = ["BASE_MB", "CHECKPOINTS", "FIGURES", "calib_fingerprints", "calib_params", "calib_sources",
           "check_calib_sets", "check_config", "check_models", "check_yaml", "chunk_folders", "chunk_layers", "chunks",
           "config_errors", "eval_settings", "evaluated_checkpoint", "exit_if_stopped", "fill", "gpus_per_job",
           "job_label", "job_mem_mb", "lmms_eval_command", "lmms_gpus", "model_files", "model_fingerprints",
           "model_params", "name_pattern", "other_tables", "plot_runs", "print_notes", "quantized_widths", "run_specs",
           "script_logging", "search_runs", "search_start", "source_fingerprints", "summary_rows", "target_triples",
           "targets", "watch"]
