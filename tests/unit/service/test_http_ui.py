"""The page at ``/`` (service.http_ui) in process, over a real DataPlane and the tiny package: its files, its
security headers, the token gate, ``--ui false``; and rules its files must keep (no inline script, no
markup built from data). The page itself runs in a real browser in tests/e2e/test_ui_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from service.http_ui import CSP, TOKEN_COOKIE, UI_DIR, ui_files
from tests.unit.service.conftest import serving

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def client(shared_tiny_store: TinyStore) -> Iterator[TestClient]:
    with serving(shared_tiny_store.store, decode_workers=1) as running:
        yield running


def _csp(response: Any) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    return {part.split()[0]: part.partition(" ")[2] for part in policy.split("; ")}


def test_the_page_is_served_with_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/ui/app.js">' in response.text
    policy = _csp(response)
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["img-src"] == "'self' data: blob:" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("style.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_the_page_files_are_served_with_their_type(client: TestClient, name: str, media_type: str) -> None:
    response = client.get(f"/ui/{name}")
    assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
    assert response.content == (UI_DIR / name).read_bytes()
    assert response.headers["content-security-policy"] == CSP


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/index.html", "/ui/login.html", "/ui/..%2Fhttp_ui.py", "/ui/"])
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, path
    assert "error" in response.json()


def test_every_module_the_page_imports_is_served(client: TestClient) -> None:
    """A module imported but not shipped would fail only in a browser: follow every import from app.js."""
    pending, seen = ["app.js", "login.js"], set()
    while pending:
        name = pending.pop()
        seen.add(name)
        response = client.get(f"/ui/{name}")
        assert response.status_code == 200, name
        imported = re.findall(r'^import .* from "\./([\w.]+)";$', response.text, flags=re.MULTILINE)
        pending += [module for module in imported if module not in seen]
    assert seen == {name for name in ui_files() if name.endswith(".js")}


def test_ui_false_serves_no_page(shared_tiny_store: TinyStore) -> None:
    with serving(shared_tiny_store.store, decode_workers=1, ui=False) as client:
        assert client.get("/").status_code == 404
        assert client.get("/ui/app.js").status_code == 404
        assert client.get("/v2/models").json() == {"models": ["tiny"]}  # the API is unchanged


def test_with_an_inference_token_the_page_needs_it(shared_tiny_store: TinyStore) -> None:
    with serving(shared_tiny_store.store, decode_workers=1, inference_token=TOKEN) as client:
        refused = client.get("/")
        assert refused.status_code == 401 and '<form id="login">' in refused.text
        assert refused.headers["content-security-policy"] == CSP
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client.cookies.set(TOKEN_COOKIE, "wrong")
        assert client.get("/").status_code == 401
        client.cookies.set(TOKEN_COOKIE, TOKEN)
        assert client.get("/").status_code == 200  # the cookie the sign-in page leaves
        client.cookies.clear()
        opened = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert opened.status_code == 200 and "/ui/app.js" in opened.text
        assert client.get("/ui/login.js").status_code == 200  # the sign-in page's own script: no data in it


def test_the_model_list_needs_the_token_and_the_api_ignores_the_cookie(shared_tiny_store: TinyStore) -> None:
    with serving(shared_tiny_store.store, decode_workers=1, inference_token=TOKEN) as client:
        assert client.get("/v2/models").status_code == 401
        client.cookies.set(TOKEN_COOKIE, TOKEN)
        assert client.get("/v2/models").status_code == 401  # a cookie opens the page only: no cross-site calls
        listed = client.get("/v2/models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.json() == {"models": ["tiny"]}


# ---- rules the page's files keep ------------------------------------------------------------------------
HTML_FILES = sorted(name for name in ui_files() if name.endswith(".html"))
JS_FILES = sorted(name for name in ui_files() if name.endswith(".js"))


@pytest.mark.parametrize("name", HTML_FILES)
def test_pages_have_no_inline_script_or_style(name: str) -> None:
    text = (UI_DIR / name).read_text(encoding="utf-8")
    scripts = re.findall(r"<script\b[^>]*>", text)
    assert scripts and all('src="/ui/' in tag and 'type="module"' in tag for tag in scripts)
    assert all(not body.strip() for body in re.findall(r"<script\b[^>]*>(.*?)</script>", text, re.S)), "inline script"
    assert not re.search(r"\son[a-z]+\s*=", text), "inline event handler"
    assert not re.search(r"<style\b|\sstyle\s*=", text), "inline style"
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "nothing from another origin"


@pytest.mark.parametrize("name", JS_FILES)
def test_scripts_never_build_markup_from_text(name: str) -> None:
    text = (UI_DIR / name).read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in text, f"{name} uses {sink}"
    assert not re.search(r"https?://", text), "nothing from another origin"


def test_the_page_files_ship_with_the_package() -> None:
    """pyproject's package data must name every file of the page, or an installed server has no page."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((UI_DIR.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    for path in UI_DIR.iterdir():
        relative = path.relative_to(UI_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert set(ui_files()) == {path.name for path in UI_DIR.iterdir()}  # and the server serves each of them
