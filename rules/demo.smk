# The offline demo: real photos shipped by Python packages, hand-written captions, and a tiny
# random-init VLM of a real architecture. Any model or data path under results/demo/ is built here.


rule demo_data:
    output:
        captions_train="results/demo/data/captions_train.json",
        captions_val="results/demo/data/captions_val.json",
        text="results/demo/data/text.jsonl",
        images=directory("results/demo/data/images"),
    log:
        "results/logs/demo_data.log",
    script:
        "../scripts/demo_data.py"


rule demo_model:
    output:
        directory("results/demo/model-{family}"),
    params:
        seed=0,
    log:
        "results/logs/demo_model-{family}.log",
    script:
        "../scripts/demo_model.py"
