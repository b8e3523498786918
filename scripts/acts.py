from pathlib import Path

from vlmquant.search.pipeline import run_acts
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    out = Path(snakemake.output[0])
    starts = list(snakemake.params.starts)
    run_acts(dict(snakemake.params.model), snakemake.input.inputs, starts,
             [out / f"layer_{i:03d}.safetensors" for i in starts], device=snakemake.params.device)
