#!/usr/bin/env bash
# CI: build the container images and run them for real (.ci/run calls this after the test suite).
#
#   1. podman and runc from Debian when absent, configured for this kind of machine (runc, cgroupfs,
#      file events, ulimits no higher than the host allows) through a containers.conf of this run only;
#   2. a demo package: `finetune --demo` with the project's venv (its test predictions are the answers
#      the images must give);
#   3. the slim CPU image (always), built on a base made from Debian's packages (no registry here) with
#      this machine's CA bundle as pip's build secret: started with the package mounted read-only, ready
#      within 120 s, every test image asked over tritonclient HTTP and gRPC and curl /predictions and
#      compared with finetune's answers, its HEALTHCHECK run, a TorchScript-only package refused naming
#      the `serve` image, SIGTERM answered with exit 0; the image must stay under 1 GB;
#   4. deploy/k8s's Deployment and Service played with `podman kube play` on the slim image: probes and
#      Service ports checked, the pod stopped (exit 0) and taken down;
#   5. the GPU images when the disk has room (else one line says why they are skipped): `finetune --demo`
#      inside the finetune image with --network none, then the serve image serving what it published.
# Every container, pod and image this run made is removed at the end, whatever happened; podman and
# the rest stay installed. Prints each stage's time and the measured sizes and start-to-ready times.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=$REPO/.venv/bin/python
RUN_ID=ci$$
TAG=$RUN_ID
LOCAL_BASE=localhost/imgclf-python:3.11-bookworm
CPU_IMAGE=localhost/imgclf-cpu:$TAG
SERVE_IMAGE=localhost/imgclf:$TAG
FINETUNE_IMAGE=localhost/imgclf-finetune:$TAG
GPU_NEED_GB=$(sed -n 's/^declare -A NEED_GB=.*\[serve\]=\([0-9]*\).*/\1/p' scripts/build-images.sh)
CA_BUNDLE=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
WORK=$(mktemp -d /var/tmp/imgclf-ci.XXXXXX)
made_images=() base_made=0 pause_made=0 played="" sampler=""

stage_start=$SECONDS
stage() { echo "ci-images: $1 took $((SECONDS - stage_start)) s" >&2; stage_start=$SECONDS; }
say() { echo "ci-images: $*" >&2; }
fail() { echo "ci-images: FAILED: $*" >&2; exit 1; }

cleanup() {
  local status=$?
  set +e
  [ -z "$sampler" ] || kill "$sampler" 2>/dev/null
  [ -z "$played" ] || podman kube down "$played" >/dev/null 2>&1
  podman ps -aq --filter "label=imgclf-ci=$RUN_ID" | xargs -r podman rm -f >/dev/null 2>&1
  ((${#made_images[@]} == 0)) || podman rmi -f "${made_images[@]}" >/dev/null 2>&1
  ((base_made == 0)) || podman rmi -f "$LOCAL_BASE" >/dev/null 2>&1
  ((pause_made == 0)) || podman images -q --filter reference='localhost/podman-pause' | xargs -r podman rmi -f >/dev/null 2>&1
  if [ -f "$WORK/images.before" ]; then # the builds' intermediate layers: every image that was not there before
    for _ in 1 2 3; do                  # children first: a parent goes once its children have
      podman images -aq --no-trunc | sort | comm -13 "$WORK/images.before" - | xargs -r podman rmi -f >/dev/null 2>&1
    done
  fi
  rm -rf "$WORK"
  say "removed this run's containers and images; podman now holds $(podman images -aq 2>/dev/null | wc -l) images"
  exit $status
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
image_mb() { echo $(($(podman image inspect --format '{{.Size}}' "$1") / 1000000)); }
free_gb_in() { df -P -BG "$1" | awk 'NR == 2 { sub("G", "", $4); print $4 }'; }

# ---- 1. podman -------------------------------------------------------------------------------------
setup_podman() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v catatonit >/dev/null || missing+=(catatonit) # kube play's pause image
  command -v iptables >/dev/null || missing+=(iptables)   # published ports
  command -v curl >/dev/null || missing+=(curl)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  if ((${#missing[@]})); then
    say "installing ${missing[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # runc: crun fails on these VMs' hybrid cgroups. The ulimits: podman's default (1048576) is above
  # what the host allows and runc may only lower a limit; conmon runs with at most 32768 processes here.
  local nofile nproc
  nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
  [ "$nofile" != unlimited ] && ((nofile < 1048576)) || nofile=1048576
  [ "$nproc" != unlimited ] && ((nproc < 32768)) || nproc=32768
  cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF=$WORK/containers.conf
  podman info >/dev/null || fail "podman does not start (podman info)"
  say "$(podman --version), runc $(runc --version | sed -n 's/^runc version //p'), storage $(podman info --format '{{.Store.GraphRoot}}')"
}

# A server container of this run, published on 127.0.0.1 only; sets HTTP, GRPC, METRICS. Usage: NAME STORE IMAGE [RUN-ARGS...]
start_server() {
  local name=$1 models=$2 image=$3
  shift 3
  HTTP=$(free_port) GRPC=$(free_port) METRICS=$(free_port)
  podman run -d --name "$name" --label "imgclf-ci=$RUN_ID" --stop-timeout 40 \
    -p "127.0.0.1:$HTTP:8000" -p "127.0.0.1:$GRPC:8001" -p "127.0.0.1:$METRICS:8002" \
    -v "$models:/models:ro" "$@" "$image" >/dev/null 2> >(quiet >&2)
}
# podman without systemd says at every start that it cannot schedule the HEALTHCHECK (run by hand below)
quiet() { grep -v 'systemd connection' || true; }
wait_ready() {  # NAME: prints the seconds from start to ready
  local seconds
  seconds=$("$PY" scripts/ci_images_smoke.py wait "http://127.0.0.1:$HTTP/v2/health/ready" --timeout "${2:-120}") ||
    { podman logs "$1" 2>&1 | tail -20 >&2; fail "$1 did not get ready"; }
  echo "$seconds"
}
check_running_server() {  # NAME PREDICTIONS [PATH-MAP]: answers, HEALTHCHECK, SIGTERM -> exit 0
  local name=$1 predictions=$2 map=${3:-} code
  "$PY" scripts/ci_images_smoke.py compare --http "127.0.0.1:$HTTP" --grpc "127.0.0.1:$GRPC" \
    --predictions "$predictions" ${map:+--path-map "$map"} || { podman logs "$name" 2>&1 | tail -20 >&2; exit 1; }
  metrics=$(curl -sf "http://127.0.0.1:$METRICS/metrics") || fail "$name: its metrics port does not answer"
  grep -q '^inference_request_duration_seconds_count' <<<"$metrics" || fail "$name: no request metrics on its metrics port"
  podman healthcheck run "$name" >"$WORK/health.out" 2>&1 ||
    fail "$name: the image's HEALTHCHECK does not pass: $(cat "$WORK/health.out")"
  say "$name: HEALTHCHECK healthy"
  podman stop -t 40 "$name" >/dev/null 2> >(quiet >&2)
  code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || { podman logs "$name" 2>&1 | tail -20 >&2; fail "$name: exit $code after SIGTERM"; }
  podman logs "$name" 2>&1 | grep -q "service.server: stopped" || fail "$name: no clean shutdown in its log"
  say "$name: SIGTERM -> drained, exit 0"
}

build() {  # TARGET...: with scripts/build-images.sh; its own lines shown, the whole log on failure
  bash scripts/build-images.sh --builder podman --local-base --ca-bundle "$CA_BUNDLE" --tag "$TAG" "$@" \
    >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "scripts/build-images.sh $*"; }
  grep '^build-images.sh' "$WORK/build.log" >&2
}

setup_podman
podman images -aq --no-trunc | sort >"$WORK/images.before"
stage "podman setup"

# ---- 2. the demo package ----------------------------------------------------------------------------
mkdir -p "$WORK/host"
(cd "$WORK/host" && "$REPO/.venv/bin/finetune" --demo --output-dir runs --model-store model_store >finetune.log 2>&1) ||
  { tail -20 "$WORK/host/finetune.log" >&2; fail "finetune --demo on the host"; }
HOST_PREDICTIONS=$(ls "$WORK"/host/runs/*/test_predictions.tsv)
stage "finetune --demo on the host (the package the images serve)"

# ---- 3. the slim CPU image ----------------------------------------------------------------------------
podman image exists "$LOCAL_BASE" || base_made=1
made_images+=("$CPU_IMAGE")
build serve-cpu
cpu_mb=$(image_mb "$CPU_IMAGE")
((cpu_mb <= 1000)) || fail "$CPU_IMAGE is $cpu_mb MB, over the 1 GB the slim image must stay under"
stage "serve-cpu image built ($cpu_mb MB; base $(image_mb "$LOCAL_BASE") MB)"

if podman run --rm --entrypoint python "$CPU_IMAGE" -c "import torch" 2>/dev/null; then fail "torch is in $CPU_IMAGE"; fi
start_server "imgclf-ci-cpu-$RUN_ID" "$WORK/host/model_store" "$CPU_IMAGE" -e SERVE_PRECISION=fp32
ready=$(wait_ready "imgclf-ci-cpu-$RUN_ID")
say "serve-cpu (fp32, one demo package): start to ready $ready s"
check_running_server "imgclf-ci-cpu-$RUN_ID" "$HOST_PREDICTIONS"
start_server "imgclf-ci-cpu-auto-$RUN_ID" "$WORK/host/model_store" "$CPU_IMAGE"
ready=$(wait_ready "imgclf-ci-cpu-auto-$RUN_ID")
say "serve-cpu (auto: backends and precisions timed at load): start to ready $ready s"
podman rm -f -t 10 "imgclf-ci-cpu-auto-$RUN_ID" >/dev/null 2> >(quiet >&2)
# A TorchScript-only package: refused with a message that names the image to use.
mkdir -p "$WORK/ts/demo" && cp -r "$WORK/host/model_store/demo/1" "$WORK/ts/demo/1" && rm "$WORK/ts/demo/1/model.onnx"
"$PY" - "$WORK/ts/demo/1/manifest.json" <<'EOF'
import json, sys
manifest = json.load(open(sys.argv[1]))
manifest["formats"].pop("onnx"), manifest["files"].pop("model.onnx")
json.dump(manifest, open(sys.argv[1], "w"))
EOF
start_server "imgclf-ci-ts-$RUN_ID" "$WORK/ts" "$CPU_IMAGE"
for _ in $(seq 60); do
  podman logs "imgclf-ci-ts-$RUN_ID" 2>&1 | grep -q "failed to load" && break
  sleep 1
done
refusal=$(podman logs "imgclf-ci-ts-$RUN_ID" 2>&1 | grep "failed to load" || true)
[[ "$refusal" == *"torch, which is not installed"*"the \`serve\` image"* ]] ||
  fail "a TorchScript-only package in serve-cpu: expected a refusal naming the serve image, got: ${refusal:-nothing}"
podman rm -f -t 10 "imgclf-ci-ts-$RUN_ID" >/dev/null 2> >(quiet >&2)
say "serve-cpu refuses a TorchScript-only package: ${refusal#*ERROR }"
stage "serve-cpu smoke (tritonclient HTTP + gRPC, /predictions, metrics, HEALTHCHECK, TorchScript refusal, SIGTERM)"

# ---- 4. the Kubernetes Deployment, played ----------------------------------------------------------------
podman images -q --filter reference='localhost/podman-pause' | grep -q . || pause_made=1
ports="$(free_port),$(free_port),$(free_port)"
"$PY" scripts/ci_images_smoke.py kube-yaml --image "$CPU_IMAGE" --models "$WORK/host/model_store" \
  --host-ports "$ports" --out "$WORK/play.yaml"
played=$WORK/play.yaml
podman kube play "$played" >/dev/null 2>"$WORK/play.err" || { quiet <"$WORK/play.err" >&2; fail "podman kube play"; }
HTTP=${ports%%,*}
ready=$(wait_ready imgclf-pod-0-serve)
say "Deployment (serve-cpu, auto): start to ready $ready s"
"$PY" scripts/ci_images_smoke.py probes "$played"
answer=$(curl -sf -X POST "http://127.0.0.1:$HTTP/predictions/demo" -T finetune/demo_data/birds/adelaide-rosella.jpg)
[[ "$answer" == '{"birds":'* ]] || fail "the played Deployment does not answer /predictions: ${answer:-nothing}"
podman pod stop -t 45 imgclf-pod-0 >/dev/null 2> >(quiet >&2)
code=$(podman inspect --format '{{.State.ExitCode}}' imgclf-pod-0-serve)
[ "$code" = 0 ] || fail "the Deployment's container exited $code on stop"
podman kube down "$played" >/dev/null 2> >(quiet >&2)
played=""
say "Deployment: pod stopped (exit 0) and taken down"
stage "podman kube play of deploy/k8s (probes, Service ports, kube down)"

# ---- 5. the GPU images ------------------------------------------------------------------------------------
storage=$(podman info --format '{{.Store.GraphRoot}}')
free_gb=$(free_gb_in "$storage")
if ((free_gb < GPU_NEED_GB)); then
  say "SKIPPED the GPU images (finetune, serve): ${free_gb} GB free in $storage, they need ${GPU_NEED_GB} GB"
  exit 0
fi
say "GPU images: ${free_gb} GB free in $storage ($(podman info --format '{{.Store.GraphDriverName}}') driver), they need ${GPU_NEED_GB} GB"
echo "$free_gb" >"$WORK/min_free"
(while sleep 1; do # the lowest free space while they build: the build's peak, for NEED_GB in build-images.sh
  f=$(free_gb_in "$storage")
  if ((f < $(cat "$WORK/min_free"))); then echo "$f" >"$WORK/min_free"; fi
done) &
sampler=$!
made_images+=("$FINETUNE_IMAGE" "$SERVE_IMAGE")
build finetune serve
kill "$sampler" && sampler=""
say "GPU images: the two builds took at most $((free_gb - $(cat "$WORK/min_free"))) GB of disk at their peak"
stage "GPU images built (finetune $(image_mb "$FINETUNE_IMAGE") MB, serve $(image_mb "$SERVE_IMAGE") MB, two shared venv layers)"

mkdir -p "$WORK/gpu" && chown 10001:10001 "$WORK/gpu"
podman run --rm --label "imgclf-ci=$RUN_ID" --network none --shm-size 1g -v "$WORK/gpu:/workspace" \
  "$FINETUNE_IMAGE" --demo >"$WORK/gpu-finetune.log" 2>&1 ||
  { tail -20 "$WORK/gpu-finetune.log" >&2; fail "finetune --demo in $FINETUNE_IMAGE"; }
grep -q "published: model_store/demo/1" "$WORK/gpu-finetune.log" || fail "finetune --demo in the image published nothing"
stage "finetune --demo inside $FINETUNE_IMAGE with --network none (CPU)"

start_server "imgclf-ci-gpu-$RUN_ID" "$WORK/gpu/model_store" "$SERVE_IMAGE" -e SERVE_PRECISION=fp32
ready=$(wait_ready "imgclf-ci-gpu-$RUN_ID" 300)
say "serve (GPU image on the CPU, fp32): start to ready $ready s"
check_running_server "imgclf-ci-gpu-$RUN_ID" "$(ls "$WORK"/gpu/runs/*/test_predictions.tsv)" "/app/=$REPO/"
stage "serve image serving what the finetune image published"
