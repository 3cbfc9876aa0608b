"""Version policy, default-version choice, DEFAULT files, the management pin body and the poll diff."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.errors import InvalidInput
from service.versions import (
    POLICY_FORMS,
    Plan,
    VersionPolicy,
    choose_default,
    folder_signature,
    parse_pin,
    parse_version_policy,
    plan_versions,
    read_default_file,
)


@pytest.mark.parametrize(
    ("text", "available", "served"),
    [
        ("all", [3, 1, 2], [1, 2, 3]),
        ("latest:1", [1, 2, 5], [5]),
        ("latest:2", [1, 2, 5], [2, 5]),
        ("latest:9", [1, 2], [1, 2]),
        ("specific:1,3", [1, 2, 3, 4], [1, 3]),
        ("specific:3,1,3", [1, 2], [1]),
        (" latest:1 ", [], []),
    ],
)
def test_a_policy_selects_the_versions_to_serve(text: str, available: list[int], served: list[int]) -> None:
    assert parse_version_policy(text).select(available) == served


def test_a_policy_reads_back_as_written() -> None:
    assert [str(parse_version_policy(t)) for t in ("all", "latest:3", "specific:3,1")] == [
        "all",
        "latest:3",
        "specific:1,3",
    ]
    assert parse_version_policy("all") == VersionPolicy()


@pytest.mark.parametrize(
    "text", ["", "foo", "latest", "latest:", "latest:0", "latest:-1", "latest:x", "specific:", "specific:0",
             "specific:1,,2", "specific:-2", "all:1", "LATEST:1"],
)  # fmt: skip
def test_a_bad_policy_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="version_policy=") as refused:
        parse_version_policy(text)
    assert str(refused.value).endswith(POLICY_FORMS) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("ready", "pinned", "default"),
    [
        (["1", "2", "10"], None, "10"),  # numerically newest, not "2" > "10"
        (["1", "2"], "1", "1"),
        (["1", "2"], "3", "2"),  # a pin to a version that is not ready falls back to the newest ready one
        ([], "1", None),
        ([], None, None),
    ],
)
def test_the_default_is_the_ready_pin_else_the_newest_ready(
    ready: list[str], pinned: str | None, default: str | None
) -> None:
    assert choose_default(ready, pinned) == default


@pytest.mark.parametrize(("text", "pinned"), [("2\n", "2"), (" 007 ", "7"), ("0", None), ("two", None), ("", None)])
def test_a_default_file_pins_a_version_number(tmp_path: Path, text: str, pinned: str | None) -> None:
    (tmp_path / "DEFAULT").write_text(text)
    assert read_default_file(tmp_path) == pinned


def test_without_a_default_file_nothing_is_pinned(tmp_path: Path) -> None:
    assert read_default_file(tmp_path) is None
    assert read_default_file(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("body", "version"), [(b'{"version": "2"}', "2"), (b'{"version": 3}', "3"), (b'{"version": null}', None)]
)
def test_the_pin_body_names_a_version_or_unpins(body: bytes, version: str | None) -> None:
    assert parse_pin(body) == version


@pytest.mark.parametrize("body", [b"", b"{}", b"[]", b"nope", b'{"version": "0"}', b'{"version": true}', b"\xff"])
def test_a_bad_pin_body_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="positive version"):
        parse_pin(body)


def test_the_plan_loads_new_reloads_changed_and_unloads_removed_versions() -> None:
    a, b, c = ((("x", 1, 1),), (("x", 2, 2),), (("y", 1, 1),))
    plan = plan_versions({"1": a, "2": b, "10": a}, {"1": a, "2": c, "3": a, "11": b})
    assert plan == Plan(load=["3", "11"], reload=["2"], unload=["10"])
    assert plan
    assert not plan_versions({"1": a}, {"1": a})
    assert plan_versions({}, {}) == Plan()


def test_a_signature_changes_when_a_folder_is_republished_or_edited(tmp_path: Path) -> None:
    folder = tmp_path / "1"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"abc")
    first = folder_signature(folder)
    assert first == folder_signature(folder) and first
    (folder / "model.onnx").write_bytes(b"abcd")
    edited = folder_signature(folder)
    assert edited != first
    staging = tmp_path / ".staging"
    shutil.copytree(folder, staging)  # copy2 keeps the files' times: only the folder itself differs
    shutil.rmtree(folder)
    staging.rename(folder)
    assert folder_signature(folder) not in (first, edited)
    assert folder_signature(tmp_path / "gone") == ()
