"""A small HTTP client of the REST API (what the CLI uses); httpx is imported lazily."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8765"


class ApiError(RuntimeError):
    """The API refused a request (or could not be reached); ``str()`` is a readable message."""

    def __init__(self, status: int | None, detail: Any) -> None:
        self.status, self.detail = status, detail
        super().__init__(format_detail(status, detail))


def format_detail(status: int | None, detail: Any) -> str:
    """The API's ``detail`` for people: a 422's problems one a line as ``loc: msg (fix)``."""
    if isinstance(detail, list):
        lines = [f"the server refused the study spec ({len(detail)} problem(s)):"]
        for p in detail:
            if not isinstance(p, dict):
                lines.append(f"  - {p}")
                continue
            where = ".".join(str(x) for x in p.get("loc") or []) or "(spec)"
            fix = f" (fix: {p['fix']})" if p.get("fix") else ""
            lines.append(f"  - {where}: {p.get('msg', '')}{fix}")
        return "\n".join(lines)
    prefix = f"HTTP {status}: " if status else ""
    return f"{prefix}{detail}"


def spec_body(path: str | Path) -> tuple[bytes, str]:
    """A spec file's bytes and content type (JSON by extension or first character, else YAML)."""
    data = Path(path).read_bytes()
    is_json = str(path).lower().endswith(".json") or data.lstrip()[:1] == b"{"
    return data, "application/json" if is_json else "application/yaml"


class Client:
    """``Client(url, token)``: one method per route; raises :class:`ApiError`."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0,
                 transport: Any = None) -> None:
        import httpx

        self.url = (url or os.environ.get("EVOMERGE_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("EVOMERGE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(None, f"cannot reach the evomerge server at {self.url} ({exc}); is it running "
                                 "(`evomerge serve`)? Set --url or EVOMERGE_URL to another one") from None
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response.json() if response.content else None

    # ---- routes ------------------------------------------------------------------------------
    def submit(self, body: bytes, content_type: str) -> dict[str, Any]:
        return self.request("POST", "/studies", content=body, headers={"Content-Type": content_type})

    def studies(self, **filters: Any) -> dict[str, Any]:
        return self.request("GET", "/studies", params={k: v for k, v in filters.items() if v is not None})

    def study(self, study_id: str) -> dict[str, Any]:
        return self.request("GET", f"/studies/{study_id}")

    def trials(self, study_id: str, *, state: str | None = None, include: str | None = None,
               page_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every trial of the study (in ``state``, if given) by number, page by page (keyset paging:
        ``after`` the last page's ``next_after``). Compact: ``include="recipe,params"`` adds those."""
        params: dict[str, Any] = {"sort": "number", "limit": page_size}
        params.update({k: v for k, v in (("state", state), ("include", include)) if v is not None})
        while True:
            page = self.request("GET", f"/studies/{study_id}/trials", params=params)
            yield from page["items"]
            if page.get("next_after") is None:
                return
            params["after"] = page["next_after"]

    def best(self, study_id: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", f"/studies/{study_id}/best")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def action(self, study_id: str, action: str) -> dict[str, Any]:
        return self.request("POST", f"/studies/{study_id}/{action}")

    def delete(self, study_id: str) -> None:
        self.request("DELETE", f"/studies/{study_id}")

    def export(self, study_id: str, trial: int | None = None) -> dict[str, Any]:
        """Ask for an export (or get the existing one) of ``trial`` (default: the best)."""
        return self.request("POST", f"/studies/{study_id}/exports", json={"trial": trial})

    def export_state(self, study_id: str, export_id: int) -> dict[str, Any]:
        return self.request("GET", f"/studies/{study_id}/exports/{export_id}")

    def stream(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """A streaming GET (a context manager over an ``httpx.Response``); errors raise ApiError."""
        import contextlib

        import httpx

        @contextlib.contextmanager
        def opened() -> Iterator[Any]:
            try:
                with self._http.stream("GET", path, headers=headers or {},
                                       timeout=httpx.Timeout(60.0, read=300.0)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, _detail(response))
                    yield response
            except httpx.TransportError as exc:
                raise ApiError(None, f"the download from {self.url} broke off ({exc}); run the same "
                                     "command again to resume it") from None

        return opened()

    def events(self, study_id: str, after: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, data) of each server-sent event until ``end``; reconnects (after the last id) if the
        server closes the stream early."""
        import httpx

        last = after
        while True:
            params = {"after": last} if last is not None else {}
            try:
                with self._http.stream("GET", f"/studies/{study_id}/events", params=params,
                                       timeout=httpx.Timeout(60.0, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, _detail(response))
                    for kind, event_id, data in _parse_sse(response.iter_lines()):
                        if event_id is not None:
                            last = event_id
                        yield kind, data
                        if kind == "end":
                            return
            except httpx.TransportError as exc:
                raise ApiError(None, f"lost the event stream of {self.url} ({exc})") from None


def _detail(response: Any) -> Any:
    try:
        return response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text or response.reason_phrase


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    kind, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = {"text": text}
                yield kind, event_id, payload if isinstance(payload, dict) else {"value": payload}
            kind, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive ping)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id" and value.isdigit():
            event_id = int(value)
