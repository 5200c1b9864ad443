# syntax=docker/dockerfile:1
# ctc-serve: OpenAI-compatible server with CTC-drafter speculative decoding, CUDA build.
#   docker build -t ctc-serve .                                   # torch's CUDA 13.0 build
#   docker build --build-arg CUDA_VERSION=12.8.1 -t ctc-serve .   # its CUDA 12.8 build, for older drivers
#   docker run --gpus all -p 8000:8000 ctc-serve                  # serves the embedded demo model
#   docker run --gpus all --user 12345 --read-only --tmpfs /tmp -p 8000:8000 -v /models:/models:ro \
#       ctc-serve --model /models/x --drafter /models/y
#
# It installs what CI tests: CPython 3.11 (the lock's, see LOCK_PYTHON in the Makefile), every
# package in requirements.lock with its hash checked, torch at the version in
# requirements-torch.txt in its CUDA build from the PyTorch index (cuXY from CUDA_VERSION X.Y.z),
# constrained to the lock, then the project without dependencies and `pip check`. torch's CUDA
# build carries its own CUDA libraries (nvidia-* wheels, pinned exactly by that torch), so the base
# image is nvidia/cuda's small "base" flavour: it declares the driver it needs (NVIDIA_REQUIRE_CUDA)
# for the NVIDIA container runtime, without a second copy of the libraries.
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04

# ---- build: Python and every package under /opt, copied whole into the runtime stage --------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS build
ARG CUDA_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
# A standalone CPython (python-build-standalone, via uv) in /opt/python: the exact minor version the
# lock was resolved for, whatever the Ubuntu release ships. Bytecode is compiled at install, so
# nothing needs to write next to the code at run time.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv
RUN uv venv --python 3.11 /opt/venv

WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --require-hashes -r requirements.lock
COPY requirements-torch.txt ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -r requirements-torch.txt -c requirements.lock \
        --extra-index-url "https://download.pytorch.org/whl/cu$(echo "${CUDA_VERSION}" | cut -d. -f1-2 | tr -d .)"
COPY pyproject.toml README.md ./
COPY server/ server/
COPY drafter/ drafter/
COPY kernels/ kernels/
RUN uv pip install --no-deps . && uv pip check

# ---- runtime ----------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION}
# Triton compiles a small C launcher the first time each kernel runs: it needs a C compiler and libc
# headers (Python's headers come with /opt/python). Ubuntu's own gcc of this release, with its updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt /opt

# Every cache lives under /tmp (mode 1777), so any uid can run the image (`--user 12345`), and
# `--read-only --tmpfs /tmp` works. Triton compiles the kernels into its cache at start-up (the
# warm-up runs before /health turns 200); Hugging Face, TorchInductor and the CUDA driver's JIT
# cache are set too, so nothing falls back to a home directory that an arbitrary uid lacks.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/ctc-cache \
    HF_HOME=/tmp/ctc-cache/huggingface \
    TRITON_HOME=/tmp/ctc-cache \
    TRITON_CACHE_DIR=/tmp/ctc-cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/ctc-cache/torchinductor \
    CUDA_CACHE_PATH=/tmp/ctc-cache/nv \
    CTC_HOST=0.0.0.0 \
    CTC_PORT=8000 \
    CTC_MODEL=/app/models/demo-llama

WORKDIR /app
# Model weights last: they change independently of the code. Owned by root and only read by the
# server (nothing writes under a model directory), so a model directory can be mounted read-only.
# models/demo-llama-ctc, when it has been trained, is picked up as the default drafter (sibling
# <model>-ctc directory).
COPY models/ /app/models/

USER 1000:1000
EXPOSE 8000

# /health answers 200 only after the model is loaded and a warm-up request has run (kernels
# compiled): loading and compiling get a start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('CTC_PORT', '8000')}/health\", timeout=4)"]

ENTRYPOINT ["ctc-serve"]
