# syntax=docker/dockerfile:1
# Training image: NVIDIA's NGC PyTorch container (CUDA build of torch, Transformer Engine,
# flash-attn, apex, NCCL, all tested together) plus this project and megatron-core 0.16.1.
#
#   docker build -t moe-pretrain .
#   enroot import -o moe-pretrain.sqsh dockerd://moe-pretrain     # for pyxis on SLURM
#
# 25.12: Python 3.12, PyTorch 2.10 on CUDA 13.1; override with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/moe

# Dependencies in their own layer, so that code changes do not reinstall them.
# pyproject.toml pins torch to the CPU wheel CI uses; here the image's CUDA torch must stay.
# So: megatron-core without dependencies (its only hard ones, torch/numpy/packaging, ship with
# the image), then the project's other requirements, skipping what the image already ships:
# NGC tested those versions with its torch, and its pip constraint file (/etc/pip/constraint.txt)
# keeps them, and torch, from being swapped for PyPI builds while the rest is installed.
COPY pyproject.toml ./
RUN <<'EOF'
set -eu
pip install --no-cache-dir --no-deps megatron-core==0.16.1
python - > /tmp/requirements.txt <<'PY'
import importlib.metadata as md
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    requirements = tomllib.load(f)["project"]["dependencies"]
for req in requirements:
    name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
    if name in ("torch", "megatron-core"):
        continue
    try:
        md.version(name)  # shipped by the image: keep NGC's version
    except md.PackageNotFoundError:
        print(req)
PY
cat /tmp/requirements.txt
# Belt and braces: pin the image's torch explicitly too, whatever the base's pip config says.
python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/constraints.txt
if [ -f /etc/pip/constraint.txt ]; then cat /etc/pip/constraint.txt >> /tmp/constraints.txt; fi
pip install --no-cache-dir --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt
rm /tmp/requirements.txt /tmp/constraints.txt
python -c 'import torch, megatron.core, transformers; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
EOF

COPY . .
# The project itself, without dependencies (done above); no build isolation so no setuptools
# download. tools/*.py import this installed megatron_ext (they edit no sys.path). Runs also work
# from a mounted checkout: pretrain_moe.py's directory comes first on sys.path, so the checkout's
# megatron_ext wins over this copy; for the checkout's tools, set PYTHONPATH=<checkout> likewise.
# Output directories are world-writable for non-root users (pyxis runs jobs as the caller).
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && mkdir -p runs logs \
    && chmod 1777 runs logs

CMD ["python", "pretrain_moe.py", "--help"]
