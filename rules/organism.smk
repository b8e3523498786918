# The model organism (config/organism.yaml): a tiny Qwen2-VL trained on a synthetic visual
# question-answering task, shipped in the package, and its task's files (calib and held-out splits,
# the lmms-eval task). Any path under results/demo/organism/ is built here.


rule organism_data:
    """Calibration (train-split) and held-out questions as ShareGPT files with their images, the held-out
    Parquet and the lmms-eval task over it."""
    output:
        calib=paths.ORGANISM_FILES["calib"],
        heldout=paths.ORGANISM_FILES["heldout"],
        parquet=f"{paths.ORGANISM_DATA}/heldout.parquet",
        images=directory(paths.ORGANISM_FILES["images"]),
        task=directory(paths.ORGANISM_TASK),
    log:
        paths.LOGS["organism_data"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        n_calib=256,
        n_heldout=1000,
        seed=0,
    script:
        "../scripts/organism_data.py"


rule organism_model:
    """The trained organism, copied from the package."""
    output:
        directory(paths.ORGANISM_MODEL),
    log:
        paths.LOGS["organism_model"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    script:
        "../scripts/organism_model.py"
