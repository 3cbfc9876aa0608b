# syntax=docker/dockerfile:1
# Two images from one file, both for an NVIDIA GPU host (they fall back to CPU without one):
#   docker build -t imgclf:0.1.0 .                                    # `serve` (the default, last stage)
#   docker build -t imgclf-finetune:0.1.0 --target finetune .         # `finetune`
# README.md ("Deployment") has the run commands. tests/unit/test_dockerfile.py lints this file with
# hadolint and checks it against pyproject.toml; no image is built by the tests.
#
# Base image. torch 2.14.1 from PyPI is a CUDA 13.0 build (cu130) that brings its own CUDA user space
# (cudart, cuBLAS, cuDNN 9, NCCL, ... as nvidia-* / cuda-toolkit wheels) and loads it from
# site-packages; onnxruntime-gpu 1.31 (the `gpu` extra) is built for the same CUDA 13 / cuDNN 9 and uses
# those same wheels (see LD_LIBRARY_PATH below). So the image needs no CUDA from its base, only the
# host's driver, which the NVIDIA Container Toolkit mounts in (`docker run --gpus all`). An
# nvidia/cuda:*-runtime or *-cudnn-runtime base would add a second, unused CUDA (GBs), and a CUDA 12
# one would also advertise the wrong requirement. What such a base contributes to GPU access is three
# variables, set below: NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA
# (cuda>=13.0: the toolkit refuses to start the container on a driver older than CUDA 13's, R580, with a
# clear message instead of a CUDA error at the first request). The official Python image gives the
# exact Python the project pins (3.11; Ubuntu's CUDA bases carry 3.10 or 3.12) on Debian 12, the
# system the test suite runs on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with the pinned dependencies, and the project installed
# in editable mode from /app exactly as scripts/setup.sh does it, so that `python -m service.protos`
# generates the gRPC modules beside proto/ (service/_proto) where the server looks for them.
FROM ${PYTHON_IMAGE} AS builder
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /app

# Dependencies first, from pyproject.toml alone (its packages are not copied yet, and the README it
# names is a placeholder), so this multi-GB layer is rebuilt only when the pins change, not on every
# code edit. `gpu`: onnxruntime-gpu, which ships the same `onnxruntime` module as the CPU wheel that the
# base dependencies pin; both get installed, so the CPU one is removed and the GPU one re-laid over the
# files the removal took (the wheel comes from the pip cache, not the network). `torchserve`: the
# archiver that `finetune` uses for TorchServe .mar files. The import check fails the build if the
# swap did not leave a CUDA-capable onnxruntime.
COPY pyproject.toml ./
# DL3013 (pin versions in pip) cannot see that "." is this project, whose pyproject.toml pins every
# dependency; tests/unit/test_dockerfile.py checks that each pip install here installs only this
# project or the `gpu` extra's exact pin.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
 && python -m pip install ".[gpu,torchserve]" \
 && python -m pip uninstall --yes onnxruntime \
 && python -m pip install --no-deps --force-reinstall "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"

# The project itself (seconds), then the generated gRPC code and bytecode: the runtime images run as a
# user who cannot write /app, so nothing may need to be written there at start.
COPY README.md ./
COPY proto/ proto/
COPY service/ service/
COPY finetune/ finetune/
RUN python -m pip install --no-cache-dir --no-deps -e . \
 && python -m service.protos \
 && python -m compileall -q service finetune

# ---------------------------------------------------------------------------------------------------
# runtime: what both images share. No compilers or build tools: only the base's Python, the
# virtual environment (wheels only) and an unprivileged user with a fixed numeric id (10001), so that
# Kubernetes' runAsNonRoot can verify it.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
# LD_LIBRARY_PATH: torch finds the CUDA wheels through its own RPATH, onnxruntime's CUDA provider only
# through the loader's search path (its library has no RPATH). These are the two folders of the CUDA 13
# and cuDNN wheels that torch's pins install; the test checks that they exist in the host's venv.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
 && mkdir -p /models
COPY --from=builder /opt/venv /opt/venv

# ---------------------------------------------------------------------------------------------------
# finetune: training on a GPU host. Mount the image folder read-only and a writable folder for
# runs/ and model_store/ (README: "Deployment"). DataLoader workers need shared memory: --shm-size.
FROM runtime AS finetune
COPY --from=builder /app/proto /app/proto
COPY --from=builder /app/service /app/service
COPY --from=builder /app/finetune /app/finetune
ENV MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /workspace
RUN chown app:app /workspace
USER 10001:10001
ENTRYPOINT ["finetune"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------
# serve (default target): the inference server. No training code (service/ never imports finetune/).
# Every setting also comes from SERVE_<NAME> (serve --help): listen on every interface, models from
# /models (a volume, a PersistentVolumeClaim, or a derived image with `COPY model_store/ /models/`),
# metrics on their own port so Prometheus can scrape without the inference port's TLS or token.
FROM runtime AS serve
COPY --from=builder /app/proto /app/proto
COPY --from=builder /app/service /app/service
ENV SERVE_HOST=0.0.0.0 \
    SERVE_MODEL_STORE=/models \
    SERVE_HTTP_PORT=8000 \
    SERVE_GRPC_PORT=8001 \
    SERVE_METRICS_PORT=8002
WORKDIR /home/app
USER 10001:10001
# HTTP (KServe v2, TorchServe API), gRPC (both protocols), Prometheus /metrics
EXPOSE 8000 8001 8002
# Ready: every model loaded and warmed up. The start period covers loading and CUDA initialisation.
# With SERVE_TLS_CERT it asks over HTTPS without verifying: the certificate names the service, not
# 127.0.0.1. tests/e2e/test_prometheus.py runs this command against a real server.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = os.environ.get('SERVE_TLS_CERT'); r.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ['SERVE_HTTP_PORT'] + '/v2/health/ready', timeout=4, context=ssl._create_unverified_context() if tls else None)"]
# SIGTERM: stop accepting, finish accepted requests (SERVE_DRAIN_TIMEOUT_S, 30 s), exit 0.
# Give it time: `docker run --stop-timeout 40`, Kubernetes terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["serve"]
