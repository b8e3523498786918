from pathlib import Path

from vlmquant.organism.lmms import write_task_yaml
from vlmquant.organism.task import write_organism_data
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    out, p = snakemake.output, snakemake.params
    write_organism_data(Path(out.calib).parent, n_calib=p.n_calib, n_heldout=p.n_heldout, seed=p.seed)
    write_task_yaml(out.parquet, out.task)
