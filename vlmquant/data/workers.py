"""How many processes encode a calibration set (data.inputs.encode_rows). Light to import: the inputs rule asks it
for the job's threads when the workflow loads, which must not import torch."""

# below 8 rows a process, its fork and the tensors' way back cost about what it saves (benchmarks/inputs_processes.py)
ROWS_PER_WORKER = 8


def encode_workers(n_rows, cores=None):
    """The processes to encode `n_rows` rows on: one per ROWS_PER_WORKER rows, at least 1, at most `cores`
    (None: no cap; the inputs rule's threads, which Snakemake caps at --cores)."""
    return max(1, min(cores or n_rows, n_rows // ROWS_PER_WORKER))
