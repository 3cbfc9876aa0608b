"""The Dockerfile: hadolint-clean, and honest about the project it packages.

No Docker engine is needed (nor used): the image is not built here. What can drift without one is
checked against the sources of truth instead: the Python version and the dependencies (pyproject.toml),
the server's settings (service/settings.py), the CUDA libraries the pinned wheels install.
"""

from __future__ import annotations

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

from service.settings import Settings, from_sources

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
VENV_SITE_PACKAGES = PurePosixPath("/opt/venv/lib/python3.11/site-packages")


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
    parents = {i.stage: i.args.split()[0] for i in instructions if i.keyword == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    env: dict[str, str] = {}
    for name in reversed(chain):
        for i in instructions:
            if i.stage == name and i.keyword == "ENV":
                env.update(dict(item.split("=", 1) for item in shlex.split(i.args)))
    return env


def only(instructions: list[Instruction], stage: str, keyword: str) -> Instruction:
    found = [i for i in instructions if i.stage == stage and i.keyword == keyword]
    assert len(found) == 1, f"stage {stage!r}: expected one {keyword}, found {len(found)}"
    return found[0]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN."""
    commands = [c for i in instructions if i.keyword == "RUN" for c in re.split(r"&&|;", i.args)]
    return [shlex.split(c)[shlex.split(c).index("install") + 1 :] for c in commands if "pip install" in c]


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


def test_every_pip_install_installs_this_project_or_the_gpu_pin(
    instructions: list[Instruction], pyproject: dict
) -> None:
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    installs = pip_installs(instructions)
    assert installs, "no pip install found in the Dockerfile"
    for args in installs:
        targets = [a for a in args if not a.startswith("-")]
        assert len(targets) == 1, args
        target = targets[0]
        if target == "." or target.startswith(".["):
            used = target.removeprefix(".").strip("[]").split(",") if "[" in target else []
            assert set(used) <= set(extras), f"{target}: extras not in pyproject.toml"
            continue
        # the onnxruntime swap: exactly the `gpu` extra's pin, re-laid without its dependencies
        assert target in extras["gpu"] and "--no-deps" in args, f"pip install {target!r} is not from pyproject.toml"


def test_extras_in_the_image_are_installed_on_the_host_too(instructions: list[Instruction], pyproject: dict) -> None:
    """scripts/setup.sh installs `.[test]`: every extra the image uses is in it, except `gpu` (see below)."""
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "pip install" in setup and "-e '.[test]'" in setup
    used = {e for args in pip_installs(instructions) for a in args if a.startswith(".[") for e in a[2:-1].split(",")}
    assert "gpu" in used
    for extra in used - {"gpu"}:
        assert set(extras[extra]) <= set(extras["test"]), f"extra {extra!r} is not exercised by the test install"


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


def test_serve_image_settings_are_real_settings(instructions: list[Instruction]) -> None:
    env = stage_env(instructions, "serve")
    settings = from_sources(flags={}, environ={k: v for k, v in env.items() if k.startswith("SERVE_")})
    assert settings.host == "0.0.0.0" and settings.model_store == Path("/models")
    assert (settings.http_port, settings.grpc_port) == (Settings.http_port, Settings.grpc_port)
    exposed = {int(port) for port in only(instructions, "serve", "EXPOSE").args.split()}
    assert exposed == {settings.http_port, settings.grpc_port, settings.metrics_port}
    assert "/v2/health/ready" in only(instructions, "serve", "HEALTHCHECK").args


@pytest.mark.parametrize("stage", ["serve", "finetune"])
def test_targets_run_their_command_as_a_numeric_unprivileged_user(
    instructions: list[Instruction], pyproject: dict, stage: str
) -> None:
    assert json.loads(only(instructions, stage, "ENTRYPOINT").args) == [stage]
    assert stage in pyproject["project"]["scripts"]
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
