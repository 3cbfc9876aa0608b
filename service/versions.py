"""Which versions of a model are served, which one answers unversioned requests, and what changed on disk.

Pure functions over version numbers and folders, shared by the repository and the store poller:

    policy = parse_version_policy("latest:2")
    policy.select([1, 2, 5])                      # [2, 5]
    choose_default(["1", "2"], pinned="1")        # "1": a pin to a ready version wins
    plan_versions(loaded={"1": sig1}, on_disk={"1": sig1, "2": sig2})  # Plan(load=["2"], ...)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import InvalidInput

logger = logging.getLogger(__name__)

POLICY_FORMS = "all, latest:N (N >= 1) or specific:V[,V...] (positive versions)"
DEFAULT_FILE = "DEFAULT"  # <store>/<model>/DEFAULT: the version number that answers unversioned requests

# What a version folder looked like when it was read: (name, inode or size, mtime) of the folder and its files.
Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class VersionPolicy:
    """Triton's version policy: ``all`` versions, the ``latest`` N, or ``specific`` ones."""

    kind: str = "all"
    count: int = 0
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions to serve among ``available``, ascending."""
        found = sorted(set(available))
        if self.kind == "latest":
            return found[-self.count :]
        if self.kind == "specific":
            return [v for v in found if v in self.versions]
        return found

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"


def parse_version_policy(text: str) -> VersionPolicy:
    """``all``, ``latest:N`` or ``specific:1,3``; ValueError naming the accepted forms otherwise."""
    kind, _, rest = text.strip().partition(":")
    try:
        if kind == "all" and not rest:
            return VersionPolicy()
        if kind == "latest":
            count = int(rest)
            if count >= 1:
                return VersionPolicy("latest", count=count)
        if kind == "specific":
            versions = tuple(sorted({int(v) for v in rest.split(",")}))
            if versions and versions[0] >= 1:
                return VersionPolicy("specific", versions=versions)
    except ValueError:
        pass
    raise ValueError(f"version_policy={text!r} is not one of {POLICY_FORMS}")


def choose_default(ready: Iterable[str], pinned: str | None = None) -> str | None:
    """The version answering unversioned requests: ``pinned`` if it is ready, else the newest ready one."""
    versions = sorted(ready, key=int)
    if pinned is not None and pinned in versions:
        return pinned
    return versions[-1] if versions else None


def parse_pin(body: bytes) -> str | None:
    """The management call's body, ``{"version": "2"}`` (or 2), or ``{"version": null}`` to unpin."""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        data = None
    version = data.get("version", "missing") if isinstance(data, dict) else "missing"
    if version is None:
        return None
    text = str(version)
    if isinstance(version, bool) or not text.isdigit() or int(text) < 1:
        raise InvalidInput('expected a JSON body {"version": "<positive version>"} or {"version": null} to unpin')
    return str(int(text))


def read_default_file(model_dir: Path) -> str | None:
    """The version pinned by ``<model_dir>/DEFAULT`` (a positive integer), None without one or if unreadable."""
    path = model_dir / DEFAULT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    if not text.isdigit() or int(text) < 1:
        logger.warning("ignoring %s: expected a version number, found %r", path, text[:40])
        return None
    return str(int(text))


def folder_signature(path: Path) -> Signature:
    """What ``path`` holds now, cheaply: a republished or edited package gets a different signature.

    Empty when the folder cannot be read (it is then treated as changed once it can).
    """
    try:
        stat = path.stat()
        files = [(p.name, p.stat()) for p in path.iterdir()]
    except OSError:
        return ()
    rows = sorted((name, st.st_size, st.st_mtime_ns) for name, st in files)
    return ((".", stat.st_ino, stat.st_mtime_ns), *rows)


@dataclass(frozen=True)
class Plan:
    """What to do to one model's loaded versions to match the store: versions as strings, ascending."""

    load: list[str] = field(default_factory=list)  # on disk, not loaded
    reload: list[str] = field(default_factory=list)  # loaded, but the folder changed since
    unload: list[str] = field(default_factory=list)  # loaded, gone from disk (or from the policy)

    def __bool__(self) -> bool:
        return bool(self.load or self.reload or self.unload)


def plan_versions(loaded: Mapping[str, Signature], on_disk: Mapping[str, Signature]) -> Plan:
    """Diff the loaded versions (with the signature each was loaded from) against those wanted on disk."""
    return Plan(
        load=sorted(set(on_disk) - set(loaded), key=int),
        reload=sorted((v for v in set(on_disk) & set(loaded) if on_disk[v] != loaded[v]), key=int),
        unload=sorted(set(loaded) - set(on_disk), key=int),
    )
