# Three images from one file (scripts/build-images.sh builds them with Docker or podman):
#   docker build -t imgclf:0.1.0 .                                    # `serve` (the default, last stage): GPU
#   docker build -t imgclf-finetune:0.1.0 --target finetune .         # `finetune`: GPU
#   docker build -t imgclf-cpu:0.1.0 --target serve-cpu .             # `serve-cpu`: slim, CPU, no torch
# README.md ("Deployment") has the run commands, the measured sizes and times, and the builder options
# (a base image made from Debian's packages, a TLS-inspecting proxy's CA). tests/unit/test_dockerfile.py
# lints this file with hadolint and checks it against pyproject.toml; scripts/ci-images.sh (run by
# .ci/run) builds every target and runs it.
# No `# syntax=` line: the builders' own Dockerfile frontends know RUN --mount (Docker 20.10+ with
# BuildKit, podman 4), and a syntax line makes BuildKit pull its frontend from Docker Hub, which a
# registry-less builder cannot.
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
# system the test suite runs on. A builder that cannot reach a container registry passes
# --build-arg PYTHON_IMAGE=<a local image>: scripts/build-images.sh --local-base makes one from
# Debian 12's own python3.11 (mmdebstrap) whose paths match (python, /opt/venv/lib/python3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# base: what every image shares: the unprivileged user with a fixed numeric id (10001, so that
# Kubernetes' runAsNonRoot can verify it), an empty virtual environment in /opt/venv, /models, and
# pyproject.toml. No compilers or build tools: every dependency is a wheel.
#
# Each image builds its virtual environment in place, in the stage the image is made from, and not in
# a builder stage copied over with `COPY --from`: a copy stores the venv twice on the builder (the
# builder's layer and the copy, 2 x 6.7 GB for the GPU images), while the two GPU images below share
# venv layers. pip's downloads for the slim image are a cache mount (outside the image); the GPU venv
# is installed with --no-cache-dir (below). Behind a TLS-inspecting proxy pip needs the builder's CA
# bundle: it comes in as the build secret `pip-ca` (scripts/build-images.sh --ca-bundle), which pip
# alone reads through PIP_CERT, and which no layer keeps; without the secret pip uses its own CA list.
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
 && mkdir -p /models \
 && python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml ./

# ---------------------------------------------------------------------------------------------------
# serve-cpu: the slim CPU inference server. ONNX Runtime and OpenVINO, the server and its generated
# gRPC code; no torch, no CUDA, no training code (service/ never imports finetune/, and imports torch
# only for TorchScript packages, which this image refuses with a message naming the `serve` image).
# The dependencies are pyproject.toml's `serve-cpu` list (the same pins as its base dependencies, less
# training), installed from that list; the project itself goes in with --no-deps, so pip never sees
# torch. Same settings, ports, user and HEALTHCHECK as `serve`.
FROM base AS serve-cpu
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve-cpu'], sep='\n')" > /tmp/serve-cpu.txt \
 && python -m pip install --requirement /tmp/serve-cpu.txt \
 && rm /tmp/serve-cpu.txt \
 && python -c "import onnxruntime, openvino, fastapi, grpc"
COPY README.md ./
COPY proto/ proto/
COPY service/ service/
# DL3013 (pin versions in pip) cannot see that "." is this project; --no-deps installs nothing else.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -m pip install --no-cache-dir --no-deps -e . \
 && python -m service.protos \
 && python -m compileall -q service \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in serve-cpu" >&2; exit 1; fi
ENV SERVE_HOST=0.0.0.0 \
    SERVE_MODEL_STORE=/models \
    SERVE_HTTP_PORT=8000 \
    SERVE_GRPC_PORT=8001 \
    SERVE_METRICS_PORT=8002
WORKDIR /home/app
USER 10001:10001
EXPOSE 8000 8001 8002
# The same check as `serve` (below); loading an ONNX model on the CPU takes seconds, not CUDA's minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["serve"]

# ---------------------------------------------------------------------------------------------------
# gpu: the virtual environment both GPU images share (two layers, stored once on the builder and the
# host), and the project installed in editable mode from /app exactly as scripts/setup.sh does it, so that
# `python -m service.protos` generates the gRPC modules beside proto/ (service/_proto) where the server
# looks for them. The images run as a user who cannot write /app, so nothing may need to be written
# there at start: the generated code and the bytecode are made here.
FROM base AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
# LD_LIBRARY_PATH: torch finds the CUDA wheels through its own RPATH, onnxruntime's CUDA provider only
# through the loader's search path (its library has no RPATH). These are the two folders of the CUDA 13
# and cuDNN wheels that torch's pins install; the test checks that they exist in the host's venv.
#
# Dependencies first, from pyproject.toml alone (its packages are not copied yet, and the README it
# names is a placeholder), so these multi-GB layers are rebuilt only when the pins change, not on every
# code edit. Two layers, because the builder's disk peaks while a layer is committed: the container's
# files, the layer written out as a blob and the layer unpacked into storage are all there at once,
# about 3.8 times the layer (26 GB measured for one 6.9 GB venv layer). So the CUDA stack goes first,
# on its own: torch and torchvision at pyproject.toml's pins, with the CUDA wheels and triton they bring
# (5.5 GB); the rest is a second, smaller layer on top. No pip cache (--no-cache-dir, no cache mount):
# a cache would keep the ~4 GB of downloaded wheels on the same disk through those commits.
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -c "import tomllib; print(*[d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.split('==')[0] in ('torch', 'torchvision')], sep='\n')" > /tmp/torch.txt \
 && python -m pip install --no-cache-dir --requirement /tmp/torch.txt \
 && rm /tmp/torch.txt
# The rest of the dependencies. onnxruntime-gpu (the `gpu` extra's pin) ships the same `onnxruntime`
# module as the CPU wheel that the base dependencies pin, so the CPU one (28 MB) is installed with the
# rest, removed, and the GPU one (256 MB) installed after it: downloaded once (installing `.[gpu]`
# together with the base would fetch it, then a --force-reinstall would fetch it again wherever pip's
# HTTP cache stays empty, as behind a proxy that strips caching headers). Its dependencies are all
# installed by then: its [cuda,cudnn] extras name the CUDA 13 wheels torch brought
# (tests/unit/test_dockerfile.py resolves it against them). `torchserve`: the archiver that `finetune`
# uses for TorchServe .mar files. The import check fails the build if the swap did not leave a
# CUDA-capable onnxruntime.
# DL3013 (pin versions in pip) cannot see that "." is this project, whose pyproject.toml pins every
# dependency; tests/unit/test_dockerfile.py checks that each pip install here installs only this
# project, a list of its pins or the `gpu` extra's exact pin.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && touch README.md \
 && python -m pip install --no-cache-dir ".[torchserve]" \
 && python -m pip uninstall --yes onnxruntime \
 && python -m pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"
COPY README.md ./
COPY proto/ proto/
COPY service/ service/
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -m pip install --no-cache-dir --no-deps -e . \
 && python -m service.protos \
 && python -m compileall -q service

# ---------------------------------------------------------------------------------------------------
# finetune: training on a GPU host. Mount the image folder read-only and a writable folder for
# runs/ and model_store/ (README: "Deployment"). DataLoader workers need shared memory: --shm-size.
# The training code is added here only (the `serve` image has none) and the editable install redone,
# so that it maps `finetune` too.
FROM gpu AS finetune
COPY finetune/ finetune/
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -m pip install --no-cache-dir --no-deps -e . \
 && python -m compileall -q finetune \
 && python -c "import finetune.cli"
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
FROM gpu AS serve
ENV SERVE_HOST=0.0.0.0 \
    SERVE_MODEL_STORE=/models \
    SERVE_HTTP_PORT=8000 \
    SERVE_GRPC_PORT=8001 \
    SERVE_METRICS_PORT=8002
WORKDIR /home/app
USER 10001:10001
# HTTP (KServe v2, TorchServe API), gRPC (both protocols), Prometheus /metrics
EXPOSE 8000 8001 8002
# Ready: every model loaded and warmed up (service/healthcheck.py asks /v2/health/ready on 127.0.0.1,
# over HTTPS when SERVE_TLS_CERT is set). The start period covers loading and CUDA initialisation.
# tests/e2e/test_prometheus.py runs this command against a real server.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
# SIGTERM: stop accepting, finish accepted requests (SERVE_DRAIN_TIMEOUT_S, 30 s), exit 0.
# Give it time: `docker run --stop-timeout 40`, Kubernetes terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["serve"]
