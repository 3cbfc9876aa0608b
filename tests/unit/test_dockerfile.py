"""The Dockerfile: hadolint-clean, and honest about the project it packages.

No container engine is needed (nor used) here: scripts/ci-images.sh, run by .ci/run after the test
suite, builds and runs the images. What can drift is checked against the sources of truth instead: the
Python version and the dependencies (pyproject.toml, service/'s imports), the server's settings
(service/settings.py), the CUDA libraries the pinned wheels install.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from service.healthcheck import ready_url
from service.settings import Settings, from_sources

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
VENV_SITE_PACKAGES = PurePosixPath("/opt/venv/lib/python3.11/site-packages")
SERVE_STAGES = ("serve", "serve-cpu")  # the GPU and the slim CPU server: same settings, ports, checks
GPU_STAGES = ("serve", "finetune")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    stage: str  # the `AS` name of the stage it belongs to ("" before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (enough for this file)."""
    instructions: list[Instruction] = []
    stage, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage = args.split(" AS ")[-1].strip() if " AS " in args else ""
        instructions.append(Instruction(keyword.upper(), " ".join(args.split()), stage))
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def stage_env(instructions: list[Instruction], stage: str) -> dict[str, str]:
    """ENV of a stage, including what it inherits through `FROM <stage>`."""
    env: dict[str, str] = {}
    for name in reversed(stage_chain(instructions, stage)):
        for i in instructions:
            if i.stage == name and i.keyword == "ENV":
                env.update(dict(item.split("=", 1) for item in shlex.split(i.args)))
    return env


def only(instructions: list[Instruction], stage: str, keyword: str) -> Instruction:
    found = [i for i in instructions if i.stage == stage and i.keyword == keyword]
    assert len(found) == 1, f"stage {stage!r}: expected one {keyword}, found {len(found)}"
    return found[0]


def pip_installs(instructions: list[Instruction], stage: str | None = None) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN (of one stage, or of all)."""
    runs = [i for i in instructions if i.keyword == "RUN" and stage in (None, i.stage)]
    commands = [c for i in runs for c in re.split(r"&&|;", i.args)]
    return [shlex.split(c)[shlex.split(c).index("install") + 1 :] for c in commands if "pip install" in c]


def stage_chain(instructions: list[Instruction], stage: str) -> list[str]:
    """``stage`` and the stages it is built FROM, nearest first."""
    parents = {i.stage: i.args.split()[0] for i in instructions if i.keyword == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


def test_base_image_is_the_python_that_pyproject_requires(instructions: list[Instruction], pyproject: dict) -> None:
    image = next(i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE="))
    match = re.fullmatch(r"PYTHON_IMAGE=python:(\d+)\.(\d+)-slim-\w+", image)
    assert match, image
    major, minor = int(match[1]), int(match[2])
    required = SpecifierSet(pyproject["project"]["requires-python"])
    assert f"{major}.{minor}.0" in required and f"{major}.{minor + 1}.0" not in required
    assert sys.version_info[:2] == (major, minor), "the tests run on the Python the image uses"
    assert VENV_SITE_PACKAGES.parts[4] == f"python{major}.{minor}"


SERVE_CPU_LIST = "/tmp/serve-cpu.txt"  # where the serve-cpu stage writes pyproject's `serve-cpu` list
TORCH_LIST = "/tmp/torch.txt"  # where the gpu stage writes pyproject's torch and torchvision pins


def test_every_pip_install_installs_this_project_or_a_pinned_list_of_it(
    instructions: list[Instruction], pyproject: dict
) -> None:
    """Each install is this project (with extras that exist), the `gpu` extra's pin, serve-cpu's list, or
    the torch and torchvision pins (the GPU images' first venv layer).

    The project itself goes in with --no-deps wherever its dependencies are not meant to follow:
    in serve-cpu always (they would bring torch), elsewhere after the dependency layer.
    """
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    installs = pip_installs(instructions)
    assert installs, "no pip install found in the Dockerfile"
    for args in installs:
        if "--requirement" in args:
            listed = [a for a in args if a != "--no-cache-dir"]
            assert listed in (["--requirement", SERVE_CPU_LIST], ["--requirement", TORCH_LIST]), args
            continue
        targets = [a for a in args if not a.startswith("-")]
        assert len(targets) == 1, args
        target = targets[0]
        if target == "." or target.startswith(".["):
            used = target.removeprefix(".").strip("[]").split(",") if "[" in target else []
            assert set(used) <= set(extras), f"{target}: extras not in pyproject.toml"
            continue
        # the onnxruntime swap: exactly the `gpu` extra's pin (test below: it needs nothing torch lacks)
        assert target in extras["gpu"], f"pip install {target!r} is not from pyproject.toml"
    cpu_runs = [i.args for i in instructions if i.stage == "serve-cpu" and i.keyword == "RUN"]
    assert any("['optional-dependencies']['serve-cpu']" in r and f"> {SERVE_CPU_LIST}" in r for r in cpu_runs)
    assert all("--no-deps" in args for args in pip_installs(instructions, "serve-cpu") if "." in args)
    gpu_runs = [i.args for i in instructions if i.stage == "gpu" and i.keyword == "RUN"]
    torch_run = next(r for r in gpu_runs if TORCH_LIST in r)
    assert "['project']['dependencies']" in torch_run and "('torch', 'torchvision')" in torch_run
    assert gpu_runs.index(torch_run) == 0  # the CUDA stack is the first layer, on its own
    assert all("--no-cache-dir" in args for args in pip_installs(instructions, "gpu"))
    pins = [d for d in pyproject["project"]["dependencies"] if d.split("==")[0] in ("torch", "torchvision")]
    assert len(pins) == 2 and all("==" in pin for pin in pins), pins  # the list the first layer installs


def test_extras_in_the_image_are_installed_on_the_host_too(instructions: list[Instruction], pyproject: dict) -> None:
    """scripts/setup.sh installs `.[test]`: every extra the image uses is in it; the GPU images swap in `gpu`."""
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "pip install" in setup and "-e '.[test]'" in setup
    used = {e for args in pip_installs(instructions) for a in args if a.startswith(".[") for e in a[2:-1].split(",")}
    for extra in used:
        assert set(extras[extra]) <= set(extras["test"]), f"extra {extra!r} is not exercised by the test install"
    gpu_installs = [a for args in pip_installs(instructions, "gpu") for a in args]
    assert extras["gpu"][0] in gpu_installs, "the GPU images must install onnxruntime-gpu"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, transitively, as installed here (normalized names)."""
    norm = _normalized
    seen: set[str] = set()
    todo = [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(norm(requirement.name))
    return seen


def test_serve_cpu_list_is_the_base_pins_and_covers_every_import_of_service(pyproject: dict) -> None:
    """pyproject's `serve-cpu` list: each line as pinned in `dependencies`, and enough for service/.

    Every third-party module that service/ imports, at the top or inside a function, must come from
    a distribution on the list or one they require, except torch: the slim image refuses TorchScript
    packages instead (tests/unit/service/test_backends.py).
    """
    base = set(pyproject["project"]["dependencies"])
    cpu = pyproject["project"]["optional-dependencies"]["serve-cpu"]
    assert set(cpu) <= base, f"not pinned as in dependencies: {set(cpu) - base}"
    assert not {"torch", "torchvision", "onnxruntime-gpu"} & {Requirement(r).name for r in cpu}
    available = _requirement_closure({Requirement(r).name for r in cpu})
    distributions = metadata.packages_distributions()
    imported: set[str] = set()
    for path in (REPO / "service").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"service", "__future__", "torch"}
    assert third_party, "no imports found"
    for module in sorted(third_party):
        dists = {_normalized(d) for d in distributions.get(module, [])}
        assert dists & available, f"service/ imports {module} ({dists or 'not installed'}), not on the serve-cpu list"


@pytest.mark.slow
def test_the_gpu_onnxruntime_is_a_cuda_13_build_like_torch(pyproject: dict) -> None:
    """Resolve the `gpu` extra against the installed torch: it must need no CUDA wheel that torch lacks.

    That is what makes it share torch's CUDA 13 / cuDNN 9 libraries instead of bringing a second set.
    Asks the package index (pip --dry-run: metadata only, about 10 s), as scripts/setup.sh does.
    """
    (gpu,) = pyproject["project"]["optional-dependencies"]["gpu"]
    torch = f"torch=={metadata.version('torch')}"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", gpu, torch]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    to_install = {item["metadata"]["name"] for item in json.loads(result.stdout)["install"]}
    assert to_install == {Requirement(gpu).name}, f"the gpu extra would also install {to_install}"


def test_library_path_names_the_cuda_folders_the_pinned_wheels_install(instructions: list[Instruction]) -> None:
    env = stage_env(instructions, "serve")
    site_packages = Path(sysconfig.get_paths()["purelib"])
    folders = [PurePosixPath(p) for p in env["LD_LIBRARY_PATH"].split(":")]
    assert folders
    for folder in folders:
        assert (site_packages / folder.relative_to(VENV_SITE_PACKAGES)).is_dir(), folder
    cuda = [r for r in metadata.requires("torch") or [] if r.startswith("cuda-toolkit")]
    assert cuda and "==13." in cuda[0], "torch's CUDA major changed: update NVIDIA_REQUIRE_CUDA and the cu13 path"
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=13.0"


@pytest.mark.parametrize("stage", SERVE_STAGES)
def test_serve_image_settings_are_real_settings(instructions: list[Instruction], stage: str) -> None:
    env = stage_env(instructions, stage)
    settings = from_sources(flags={}, environ={k: v for k, v in env.items() if k.startswith("SERVE_")})
    assert settings.host == "0.0.0.0" and settings.model_store == Path("/models")
    assert (settings.http_port, settings.grpc_port) == (Settings.http_port, Settings.grpc_port)
    exposed = {int(port) for port in only(instructions, stage, "EXPOSE").args.split()}
    assert exposed == {settings.http_port, settings.grpc_port, settings.metrics_port}
    check = json.loads(only(instructions, stage, "HEALTHCHECK").args.partition(" CMD ")[2])
    assert check == ["python", "-m", "service.healthcheck"] and ready_url(env).endswith("/v2/health/ready")
    assert only(instructions, stage, "STOPSIGNAL").args == "SIGTERM"


def test_the_slim_and_the_gpu_server_agree(instructions: list[Instruction]) -> None:
    """Same SERVE_* values, ports, user and health command; the slim one has nothing of CUDA."""
    gpu, cpu = (stage_env(instructions, stage) for stage in SERVE_STAGES)
    assert {k: v for k, v in gpu.items() if k.startswith("SERVE_")} == {
        k: v for k, v in cpu.items() if k.startswith("SERVE_")
    }
    for keyword in ("EXPOSE", "USER", "ENTRYPOINT", "WORKDIR"):
        assert only(instructions, "serve", keyword).args == only(instructions, "serve-cpu", keyword).args, keyword
    command = [only(instructions, stage, "HEALTHCHECK").args.partition(" CMD ")[2] for stage in SERVE_STAGES]
    assert command[0] == command[1]
    assert not [k for k in cpu if k.startswith("NVIDIA_") or k == "LD_LIBRARY_PATH"]
    for stage in GPU_STAGES:
        assert stage_env(instructions, stage)["NVIDIA_REQUIRE_CUDA"] == "cuda>=13.0"
    assert "gpu" not in stage_chain(instructions, "serve-cpu") and "finetune" not in stage_chain(instructions, "serve")
    copies = [shlex.split(i.args)[:-1] for i in instructions if i.stage == "serve" and i.keyword == "COPY"]
    assert copies == [] and "gpu" in stage_chain(instructions, "serve")  # no training code in `serve`


def test_the_venv_is_built_in_place_not_copied(instructions: list[Instruction]) -> None:
    """A `COPY --from` of /opt/venv stores it twice on the builder (6.7 GB each for the GPU images)."""
    assert not [i for i in instructions if i.keyword == "COPY" and "--from=" in i.args]
    for stage in (*SERVE_STAGES, "finetune"):
        assert "base" in stage_chain(instructions, stage)
    assert any("python -m venv /opt/venv" in i.args for i in instructions if i.stage == "base" and i.keyword == "RUN")


def test_the_ca_bundle_is_a_build_secret_for_pip_only(instructions: list[Instruction]) -> None:
    """Behind a TLS-inspecting proxy: the builder's CA bundle reaches pip as a secret, never a layer."""
    secret = "--mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca"
    for run in (i for i in instructions if i.keyword == "RUN" and "pip install" in i.args):
        assert secret in run.args and "export PIP_CERT=/run/secrets/pip-ca" in run.args, run.args[:120]
    text = " ".join(i.args for i in instructions if i.keyword in {"ENV", "COPY", "ADD", "ARG"})
    assert "PIP_CERT" not in text and "pip-ca" not in text and ".crt" not in text and ".pem" not in text


@pytest.mark.parametrize(("stage", "command"), [("serve", "serve"), ("serve-cpu", "serve"), ("finetune", "finetune")])
def test_targets_run_their_command_as_a_numeric_unprivileged_user(
    instructions: list[Instruction], pyproject: dict, stage: str, command: str
) -> None:
    assert json.loads(only(instructions, stage, "ENTRYPOINT").args) == [command]
    assert command in pyproject["project"]["scripts"]
    uid, _, gid = only(instructions, stage, "USER").args.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()


def test_serve_is_the_default_target_and_the_build_generates_the_grpc_code(instructions: list[Instruction]) -> None:
    assert [i for i in instructions if i.keyword == "FROM"][-1].stage == "serve"
    assert any(i.keyword == "RUN" and "python -m service.protos" in i.args for i in instructions)


def test_build_context_has_what_the_dockerfile_copies(instructions: list[Instruction]) -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    }
    assert {".venv", ".git", "service/_proto", "model_store"} <= ignored
    copies = [shlex.split(i.args) for i in instructions if i.keyword == "COPY" and "--from=" not in i.args]
    sources = [s.rstrip("/") for args in copies for s in args[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists() and source not in ignored, source
