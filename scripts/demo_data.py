from pathlib import Path

from vlmquant.demo.dataset import write_demo_data
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    write_demo_data(Path(snakemake.output.captions_train).parent)
