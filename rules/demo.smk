# The offline demo: real photos shipped by Python packages, hand-written captions, and a tiny
# random-init VLM of a real architecture. Any model or data path under results/demo/ is built here.


rule demo_data:
    output:
        captions_train=f"{paths.DEMO_DATA}/captions_train.json",
        captions_val=f"{paths.DEMO_DATA}/captions_val.json",
        text=f"{paths.DEMO_DATA}/text.jsonl",
        images=directory(f"{paths.DEMO_DATA}/images"),
    log:
        paths.LOGS["demo_data"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    script:
        "../scripts/demo_data.py"


rule demo_model:
    output:
        directory(paths.DEMO_MODEL),
    log:
        paths.LOGS["demo_model"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        seed=0,
    script:
        "../scripts/demo_model.py"
