#!/usr/bin/env bash
# Build the container images of the Dockerfile with Docker or podman, where users build.
#
#   scripts/build-images.sh                          # every target: serve-cpu, finetune, serve
#   scripts/build-images.sh serve-cpu                # the slim CPU server only
#   scripts/build-images.sh --local-base --ca-bundle /etc/ssl/certs/ca-certificates.crt serve-cpu
#
# Targets and the images they make (TAG: the project's version, or --tag):
#   serve-cpu  imgclf-cpu:TAG       slim CPU server: ONNX Runtime + OpenVINO, no torch, no CUDA
#   serve      imgclf:TAG           GPU server (torch, CUDA 13 wheels, onnxruntime-gpu)
#   finetune   imgclf-finetune:TAG  GPU training
# Options:
#   --builder docker|podman  which one to use (default: podman if installed, else docker with a running engine)
#   --local-base             a builder that cannot reach a container registry: make the base image from
#                            Debian 12's own packages (mmdebstrap: bookworm, python3.11, venv), import it as
#                            localhost/imgclf-python:3.11-bookworm (kept for the next build) and build FROM it
#   --ca-bundle FILE         a builder behind a TLS-inspecting proxy: FILE (a PEM bundle that trusts the
#                            proxy) goes to pip as the build secret `pip-ca`; no image keeps it
#   --tag TAG                image tag (default: the version in pyproject.toml)
# Before each target it checks the free space where the builder stores images, and stops with one line
# saying how much is free and how much the target needs. Prints each target's build time and size.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly LOCAL_BASE=localhost/imgclf-python:3.11-bookworm
# Free space a build needs at its peak, in GB, measured with podman on Debian 12 (README, "Container
# images"): the image plus the layer being committed (its files, its blob and its unpacked copy).
# The two GPU targets share their venv layers: the first of them needs the room, the second little more.
declare -A NEED_GB=([serve-cpu]=4 [serve]=24 [finetune]=24)
declare -A IMAGE=([serve-cpu]=imgclf-cpu [serve]=imgclf [finetune]=imgclf-finetune)

die() { echo "build-images.sh: $*" >&2; exit 2; }

builder="" local_base=0 ca_bundle="" tag="" targets=()
while (($#)); do
  case "$1" in
    --builder) builder=${2:-}; shift 2 || die "--builder needs docker or podman" ;;
    --local-base) local_base=1; shift ;;
    --ca-bundle) ca_bundle=${2:-}; shift 2 || die "--ca-bundle needs a file" ;;
    --tag) tag=${2:-}; shift 2 || die "--tag needs a value" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1: see scripts/build-images.sh --help" ;;
    all) targets+=(serve-cpu finetune serve); shift ;;
    serve-cpu|serve|finetune) targets+=("$1"); shift ;;
    *) die "unknown target '$1': choose serve-cpu, serve, finetune or all" ;;
  esac
done
((${#targets[@]})) || targets=(serve-cpu finetune serve)
[ -n "$tag" ] || tag=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
[ -z "$ca_bundle" ] || [ -s "$ca_bundle" ] || die "CA bundle '$ca_bundle' is not a readable, non-empty file: pass the PEM file your proxy's certificate chains to"

# ---- the builder --------------------------------------------------------------------------------
engine_works() {
  case "$1" in
    podman) command -v podman >/dev/null && podman info >/dev/null 2>&1 ;;
    docker) command -v docker >/dev/null && docker info >/dev/null 2>&1 ;;
    *) die "unknown builder '$1': use docker or podman" ;;
  esac
}
if [ -z "$builder" ]; then
  for candidate in podman docker; do
    if engine_works "$candidate"; then builder=$candidate; break; fi
  done
  [ -n "$builder" ] || die "no container builder found: install podman (Debian: apt-get install podman runc) or start a Docker engine, or pass --builder"
else
  engine_works "$builder" || die "$builder is not installed or its engine does not answer ('$builder info' fails): install or start it, or pass --builder with the other one"
fi

storage_dir() {
  if [ "$builder" = podman ]; then podman info --format '{{.Store.GraphRoot}}'; else docker info --format '{{.DockerRootDir}}'; fi
}
free_gb() {  # free GB on the file system that holds the builder's storage (its nearest existing parent)
  local dir
  dir=$(storage_dir)
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  df -P -BG "$dir" | awk 'NR == 2 { sub("G", "", $4); print $4 }'
}
check_disk() {
  local target=$1 free
  free=$(free_gb)
  local hint="free some space (e.g. '$builder image prune')"
  [ "$target" = serve-cpu ] || hint+=" or build serve-cpu alone (${NEED_GB[serve-cpu]} GB)"
  if ((free < NEED_GB[$target])); then
    die "only ${free} GB free in $(storage_dir), target $target needs ${NEED_GB[$target]} GB: $hint"
  fi
}

# ---- the base image, from Debian's packages -------------------------------------------------------
make_local_base() {
  if "$builder" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    echo "build-images.sh: base $LOCAL_BASE is there (remove it to make it anew)" >&2
    return
  fi
  command -v mmdebstrap >/dev/null || die "--local-base needs mmdebstrap: apt-get install mmdebstrap (Debian/Ubuntu)"
  local start=$SECONDS tar
  tar=$(mktemp --suffix=.tar)
  # minbase + Python 3.11 with venv (ensurepip); python-is-python3 gives `python`, as the official
  # image has. Docs, man pages and translations are left out.
  mmdebstrap --quiet --variant=minbase \
    --include=python3.11,python3.11-venv,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$tar" \
    "deb ${DEBIAN_MIRROR:-http://deb.debian.org/debian} bookworm bookworm-updates main" \
    "deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main" ||
    { rm -f "$tar"; die "mmdebstrap failed (above): set DEBIAN_MIRROR to a Debian mirror this machine reaches"; }
  "$builder" import --change 'CMD ["python3"]' "$tar" "$LOCAL_BASE" >/dev/null
  rm -f "$tar"
  echo "build-images.sh: base $LOCAL_BASE made from Debian packages in $((SECONDS - start)) s" >&2
}

# ---- the builds ---------------------------------------------------------------------------------
build_args=(--build-arg "PYTHON_IMAGE=$LOCAL_BASE")
((local_base)) || build_args=()
[ -z "$ca_bundle" ] || build_args+=(--secret "id=pip-ca,src=$ca_bundle")
if [ "$builder" = podman ]; then
  build_args+=(--format docker) # OCI images have no HEALTHCHECK; Docker's format keeps it
else
  export DOCKER_BUILDKIT=1 # RUN --mount (cache, secret)
fi

((local_base)) && make_local_base
for target in "${targets[@]}"; do
  check_disk "$target"
  image="${IMAGE[$target]}:$tag"
  start=$SECONDS
  echo "build-images.sh: building $image (target $target) with $builder" >&2
  "$builder" build "${build_args[@]}" --target "$target" --tag "$image" .
  size=$("$builder" image inspect --format '{{.Size}}' "$image")
  echo "build-images.sh: $image built in $((SECONDS - start)) s, $((size / 1000000)) MB" >&2
  # the other GPU target reuses this one's venv layers: it adds megabytes, not gigabytes
  [ "$target" = serve-cpu ] || NEED_GB[serve]=2 NEED_GB[finetune]=2
done
