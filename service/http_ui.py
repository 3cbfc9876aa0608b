"""The page at ``/``: try a model in a browser, and watch the server. Static files only, from ``service/ui/``.

The page is plain HTML, CSS and JavaScript modules shipped inside the package: no build step, no CDN,
nothing fetched from elsewhere. It talks to the server only through the public API any client uses
(``GET /v2/models``, ``GET /v2/models/{m}[/versions/{v}]``, ``POST .../infer`` with Triton's binary
extension, ``POST /explanations/...``, ``GET /metrics``), so it can show nothing a client could not see.

Every answer carries a strict Content-Security-Policy: scripts, styles and connections only from this
origin, no inline script or style, images from this origin or ``data:``/``blob:`` (the uploaded photo
and its heatmap). Labels come from the training data's folder names, so the page writes them with
``textContent`` only; the policy is the second line of defence.

With an inference token set (``SERVE_INFERENCE_TOKEN``), ``/`` needs it: ``Authorization: Bearer``
(curl) or the ``imgclf_token`` cookie that the small sign-in page answered with 401 sets. The cookie
opens the page only: every API call of the page sends the bearer header, and the API ignores cookies,
so another site cannot make a browser call the API with it. The scripts and style sheet under ``/ui/``
are public like the package's source; they hold no data.

    app.include_router(build_router(plane))      # service.http_app, unless --ui false
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

from service.dataplane import DataPlane
from service.errors import Unauthorized
from service.http_common import bearer_token

UI_DIR = Path(__file__).resolve().parent / "ui"
TOKEN_COOKIE = "imgclf_token"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new server version must not run an old script
}


@cache
def ui_files() -> dict[str, bytes]:
    """The page's files by name, read once. Only these names are ever served: no path reaches the disk."""
    return {path.name: path.read_bytes() for path in sorted(UI_DIR.iterdir()) if path.suffix in CONTENT_TYPES}


def page_response(name: str, status: int = 200) -> Response:
    """One of the page's files with its content type and the security headers."""
    body = ui_files().get(name)
    if body is None:
        raise HTTPException(404, f"no page file {name!r}")  # the v2 error format, by service.http_app
    media_type = CONTENT_TYPES[Path(name).suffix]
    return Response(body, status_code=status, media_type=media_type, headers=SECURITY_HEADERS)


def page_token(request: Request) -> str | None:
    """The token a browser or a script shows for the page: the bearer header, else the sign-in cookie."""
    return bearer_token(request) or request.cookies.get(TOKEN_COOKIE)


def build_router(plane: DataPlane) -> APIRouter:
    """``GET /`` (the page, or the sign-in page with 401) and ``GET /ui/{name}`` (its scripts and style)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        try:
            plane.check_inference_token(page_token(request))
        except Unauthorized:
            return page_response("login.html", status=401)
        return page_response("index.html")

    @router.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name.endswith(".html"):  # the pages themselves only through "/", where the token is checked
            raise HTTPException(404, f"no page file {name!r}")
        return page_response(name)

    return router
