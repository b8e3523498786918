"""Every path under results/, written once: the rules' outputs, logs and benchmark files, and what
the library reads back.

Templates hold Snakemake wildcards in braces ({model}, {calib}, {run}, {chunk}, {eval_calib},
{family}, {figure}); rules use them as they are, the library fills them with `str.format`.
{chunk} is the first decoder layer of a search job, three digits ("000", "004", …).
This module imports nothing, so anything may import it.
"""

RESULTS = "results"  # every path below is under it
DEMO_DATA = "results/demo/data"
DEMO_MODEL = "results/demo/model-{family}"
DEMO_FILES = {  # the outputs of rule demo_data
    "captions_train": DEMO_DATA + "/captions_train.json",
    "captions_val": DEMO_DATA + "/captions_val.json",
    "text": DEMO_DATA + "/text.jsonl",
    "images": DEMO_DATA + "/images",
}
# the model organism (config/organism.yaml): its task's files and the trained model shipped in the package
ORGANISM_DATA = "results/demo/organism/data"  # calib.jsonl, heldout.jsonl, heldout.parquet, images/
ORGANISM_TASK = "results/demo/organism/lmms_task"  # the lmms-eval task over heldout.parquet (--include_path)
ORGANISM_MODEL = "results/demo/organism/model"
ORGANISM_FILES = {  # the outputs of rule organism_data that a config names
    "calib": ORGANISM_DATA + "/calib.jsonl",
    "heldout": ORGANISM_DATA + "/heldout.jsonl",
    "images": ORGANISM_DATA + "/images",
}

CALIB = "results/calib/{calib}.parquet"
CALIB_FILES = "results/calib/{calib}.files.json"  # the image files a set uses, kept for the workflow's load
FINGERPRINTS = "results/.fingerprints.json"  # sha256 of the files jobs read from outside results/ (io.fingerprint)
INPUTS = "results/{model}/{calib}/inputs.safetensors"
GRADS = "results/{model}/{calib}/grads.safetensors"
ACTS = "results/{model}/{calib}/acts"  # folder: layer_NNN.safetensors, the fp inputs of each chunk's first layer

RUN = "results/{model}/{calib}/{run}"
SCALES = RUN + "/scales/chunk_{chunk}"  # folder: layer_NNN.safetensors (+ NEXT_INPUTS for distort runs)
SCALE_CACHE = RUN + "/scale_cache.pt"
SEARCH_TABLE = RUN + "/search.parquet"
CHECKPOINT = RUN + "/checkpoint"  # pseudo-quantized (weights rounded, stored in the model dtype)
PACKED = RUN + "/packed"  # compressed-tensors (packed codes and scales, for serving)
EVAL = RUN + "/eval.parquet"
LMMS = RUN + "/lmms_eval"

FP_REF = "results/{model}/eval-{eval_calib}/fp.safetensors"
FP_TABLE = "results/{model}/eval-{eval_calib}/fp.parquet"
LMMS_FP = "results/{model}/fp/lmms_eval"

SUMMARY_CSV = "results/summary.csv"
SUMMARY_PARQUET = "results/summary.parquet"
SUMMARY_HTML = "results/summary.html"  # the table as shown in `snakemake --report`
ACCURACY = "results/accuracy.json"  # task accuracy with standard errors and paired tests (report/accuracy.py)
ALL_RUNS = "results/all_runs.csv"  # every eval table present, targets or not (report/all_runs.py)
PLOT = "results/plots/{model}/{calib}/{figure}.png"

# inside the folders above
LAYER_FILE = "layer_{layer:03d}.safetensors"
LAYER_GLOB = "layer_*.safetensors"
NEXT_INPUTS = "next_inputs.safetensors"
NEXT_FP_INPUTS = "next_fp_inputs.safetensors"  # distort: reference, the fp chain beside it

# one log per job; a benchmark file (wall time, memory) per heavy job, read back by the summary
LOGS = {
    "demo_data": "results/logs/demo_data.log",
    "demo_model": "results/logs/demo_model-{family}.log",
    "organism_data": "results/logs/organism_data.log",
    "organism_model": "results/logs/organism_model.log",
    "calib": "results/logs/calib/{calib}.log",
    "inputs": "results/logs/{model}/{calib}/inputs.log",
    "grads": "results/logs/{model}/{calib}/grads.log",
    "acts": "results/logs/{model}/{calib}/acts.log",
    "search": "results/logs/{model}/{calib}/{run}/search_{chunk}.log",
    "merge": "results/logs/{model}/{calib}/{run}/merge.log",
    "import_scales": "results/logs/{model}/{calib}/{run}/import_scales.log",
    "export": "results/logs/{model}/{calib}/{run}/export.log",
    "pack": "results/logs/{model}/{calib}/{run}/pack.log",
    "eval_fp": "results/logs/{model}/eval-{eval_calib}/fp.log",
    "eval": "results/logs/{model}/{calib}/{run}/eval.log",
    "lmms_eval": "results/logs/{model}/{calib}/{run}/lmms_eval.log",
    "lmms_eval_fp": "results/logs/{model}/fp/lmms_eval.log",
    "summary": "results/logs/summary.log",
    "plots": "results/logs/plots/{model}/{calib}.log",
}
BENCHMARKS = {
    "grads": "results/benchmarks/{model}/{calib}/grads.tsv",
    "acts": "results/benchmarks/{model}/{calib}/acts.tsv",
    "search": "results/benchmarks/{model}/{calib}/{run}/search_{chunk}.tsv",
    "export": "results/benchmarks/{model}/{calib}/{run}/export.tsv",
    "pack": "results/benchmarks/{model}/{calib}/{run}/pack.tsv",
    "eval_fp": "results/benchmarks/{model}/eval-{eval_calib}/fp.tsv",
    "eval": "results/benchmarks/{model}/{calib}/{run}/eval.tsv",
}


def chunk_id(first_layer):
    """The {chunk} wildcard of the search job whose first decoder layer is `first_layer`."""
    return f"{first_layer:03d}"
