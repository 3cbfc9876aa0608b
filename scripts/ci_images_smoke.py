"""Checks that scripts/ci-images.sh runs against the images it built; loopback only.

    python scripts/ci_images_smoke.py wait http://127.0.0.1:18000/v2/health/ready --timeout 120
    python scripts/ci_images_smoke.py compare --http 127.0.0.1:18000 --grpc 127.0.0.1:18001 \\
        --predictions runs/demo-*/test_predictions.tsv
    python scripts/ci_images_smoke.py kube-yaml --image localhost/imgclf-cpu:ci --models /tmp/store \\
        --host-ports 18100,18101,18102 --out play.yaml
    python scripts/ci_images_smoke.py probes play.yaml

`compare` asks the server for every test image of a finetune run, through tritonclient over HTTP
and gRPC (KServe v2, `class_count=1`) and with curl on TorchServe's `/predictions`, and requires the
label finetune predicted and its probability within a tolerance (the exported model against the
eager one). `probes` runs a played Deployment's startup, readiness and liveness probes as the kubelet
does (an HTTP GET of the probe's path on its port, 2xx or 3xx passes) and asks each Service port.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"


def wait(url: str, timeout: float) -> float:
    """Seconds until ``url`` answers 200; SystemExit after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"ci_images_smoke: {url} not ready after {timeout:.0f} s")


def _rows(predictions: Path, path_map: list[str]) -> list[tuple[Path, str, float]]:
    """(image, predicted label, its probability) of each test image; paths mapped old=new."""
    rows = []
    for line in predictions.read_text(encoding="utf-8").splitlines()[1:]:
        path, _true, predicted, probability = line.split("\t")
        for pair in path_map:
            old, _, new = pair.partition("=")
            path = new + path[len(old) :] if path.startswith(old) else path
        rows.append((Path(path), predicted, float(probability)))
    if not rows:
        raise SystemExit(f"ci_images_smoke: no test predictions in {predictions}")
    return rows


def _top1(answer: bytes | str) -> tuple[str, float]:
    score, _index, label = (answer.decode() if isinstance(answer, bytes) else answer).split(":", 2)
    return label, float(score)


def compare(args: argparse.Namespace) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    rows = _rows(args.predictions, args.path_map)
    http = httpclient.InferenceServerClient(args.http)
    grpc = grpcclient.InferenceServerClient(args.grpc)
    worst = 0.0
    for image, label, probability in rows:
        data = np.array([image.read_bytes()], dtype=np.object_)
        answers = {}
        for name, client, module in (("http", http, httpclient), ("grpc", grpc, grpcclient)):
            tensor = module.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(data)
            wanted = [module.InferRequestedOutput("probabilities", class_count=1)]
            answers[name] = _top1(client.infer(args.model, [tensor], outputs=wanted).as_numpy("probabilities")[0][0])
        curl = ["curl", "-sf", "-X", "POST", f"http://{args.http}/predictions/{args.model}", "-T", str(image)]
        top = next(iter(json.loads(subprocess.run(curl, check=True, capture_output=True, text=True).stdout).items()))
        answers["/predictions"] = (top[0], float(top[1]))
        for name, (got, score) in answers.items():
            if got != label or abs(score - probability) > args.tolerance:
                said = f"{got} {score:.6f}, finetune said {label} {probability:.6f}"
                raise SystemExit(f"ci_images_smoke: {image.name} over {name}: {said}")
            worst = max(worst, abs(score - probability))
    print(
        f"ci_images_smoke: {len(rows)} test images: HTTP v2, gRPC and /predictions all answer finetune's label "
        f"(largest probability difference {worst:.6f}, allowed {args.tolerance})"
    )


def kube_yaml(args: argparse.Namespace) -> None:
    """deploy/k8s's Deployment and Service for `podman kube play` on this CPU host.

    Changed, and only this: the image (the slim CPU one), SERVE_DEVICE=cpu and no nvidia.com/gpu
    resource or GPU toleration (there is no GPU), the PersistentVolumeClaim replaced by a host folder,
    and each container port published on 127.0.0.1 (the Service's job in a cluster).
    """
    docs = [
        d for name in ("deployment.yaml", "service.yaml") for d in yaml.safe_load_all((K8S / name).read_text()) if d
    ]
    pod = docs[0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["image"] = args.image
    for env in container["env"]:
        if env["name"] == "SERVE_DEVICE":
            env["value"] = "cpu"
    for kind in ("requests", "limits"):
        container["resources"][kind].pop("nvidia.com/gpu", None)
    pod.pop("tolerations", None)
    for port, host_port in zip(container["ports"], args.host_ports.split(","), strict=True):
        port.update(hostPort=int(host_port), hostIP="127.0.0.1")
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    models.pop("persistentVolumeClaim")
    models["hostPath"] = {"path": str(args.models), "type": "Directory"}
    args.out.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def probes(args: argparse.Namespace) -> None:
    docs = [d for d in yaml.safe_load_all(args.manifest.read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    host_port = {p["name"]: p["hostPort"] for p in container["ports"]}
    host_port |= {p["containerPort"]: p["hostPort"] for p in container["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get: dict[str, Any] = container[kind]["httpGet"]
        status, _ = _get(f"http://127.0.0.1:{host_port[get['port']]}{get['path']}")
        if not 200 <= status < 400:
            raise SystemExit(f"ci_images_smoke: {kind} GET {get['path']} on port {get['port']}: {status}")
        print(f"ci_images_smoke: {kind} GET {get['path']} on port {get['port']}: {status}, passes")
    for port in service["spec"]["ports"]:
        target = host_port[port["targetPort"]]
        if port["name"] == "grpc":
            import tritonclient.grpc as grpcclient

            ok = grpcclient.InferenceServerClient(f"127.0.0.1:{target}").is_server_ready()
        else:
            path = "/metrics" if port["name"] == "metrics" else "/v2/health/ready"
            status, body = _get(f"http://127.0.0.1:{target}{path}")
            ok = status == 200 and (port["name"] != "metrics" or b"inference_request_duration_seconds" in body)
        if not ok:
            raise SystemExit(f"ci_images_smoke: Service port {port['name']} ({port['port']}) does not answer")
        print(f"ci_images_smoke: Service port {port['name']} {port['port']} -> container {port['targetPort']}: answers")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait", help="wait until a URL answers 200; print the seconds")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("compare", help="the server's answers against finetune's test predictions")
    p.add_argument("--http", required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--predictions", type=Path, required=True)
    p.add_argument("--model", default="demo")
    p.add_argument("--path-map", action="append", default=[], help="OLD=NEW prefix of the image paths")
    p.add_argument("--tolerance", type=float, default=2e-3)
    p = sub.add_parser("kube-yaml", help="deploy/k8s for podman kube play on this host")
    p.add_argument("--image", required=True)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--host-ports", required=True, help="http,grpc,metrics")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("probes", help="run a played Deployment's probes and ask its Service ports")
    p.add_argument("manifest", type=Path)
    return parser


def main(args: argparse.Namespace) -> None:
    if args.command == "wait":
        print(f"{wait(args.url, args.timeout):.1f}")
    else:
        {"compare": compare, "kube-yaml": kube_yaml, "probes": probes}[args.command](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
