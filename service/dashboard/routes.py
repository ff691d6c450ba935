"""Routes of the dashboard: the page, its assets, and short links into it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/ui/static"

# Same-origin only: no CDN, no inline script, no framing. blob: for downloads of exports.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}

router = APIRouter(include_in_schema=False, tags=["dashboard"])


@lru_cache(maxsize=1)
def shipped_files() -> frozenset[str]:
    """The names ``/ui/static/`` serves: the files in ``static/`` (nothing else can be reached)."""
    return frozenset(p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file())


@router.get("/")
def index() -> Response:
    """The dashboard page (studies at ``/#/``, a study at ``/#/studies/<id>``)."""
    return FileResponse(STATIC_DIR / "index.html", media_type=_TYPES[".html"],
                        headers={**_HEADERS, "Content-Security-Policy": CSP,
                                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})


@router.get(STATIC_PREFIX + "/{name:path}")
def asset(name: str) -> Response:
    if name not in shipped_files():
        raise HTTPException(404, f"the dashboard has no file {name!r}")
    path = STATIC_DIR / name
    return FileResponse(path, media_type=_TYPES.get(path.suffix, "application/octet-stream"),
                        headers=_HEADERS)


@router.get("/ui")
@router.get("/ui/")
def ui_home() -> RedirectResponse:
    return RedirectResponse("/#/", status_code=307)


@router.get("/ui/studies/{study_id}")
def ui_study(study_id: str) -> RedirectResponse:
    """A shareable link to a study's page (``/studies/<id>`` itself is the JSON API)."""
    safe = "".join(c for c in study_id if c.isalnum() or c in "-_")
    return RedirectResponse(f"/#/studies/{safe}", status_code=307)


@router.get("/favicon.ico")
def favicon() -> RedirectResponse:
    return RedirectResponse(f"{STATIC_PREFIX}/favicon.svg", status_code=307)
