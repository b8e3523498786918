# The offline demo: real photos shipped by Python packages, hand-written captions, and a tiny
# random-init VLM of a real architecture. Any model or data path under results/demo/ is built here.


rule demo_data:
    output:
        captions_train=paths.DEMO_FILES["captions_train"],
        captions_val=paths.DEMO_FILES["captions_val"],
        text=paths.DEMO_FILES["text"],
        images=directory(paths.DEMO_FILES["images"]),
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
