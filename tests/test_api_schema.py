"""Schemathesis against the live OpenAPI schema: no 5xx, every response as the schema says.

Runs with auth on and a valid token (the 401 paths are in test_api.py), over a database
holding a study with the id the schema's examples use, so that the example phase also
reaches the found-it branches.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.db import Artifact, ArtifactState, Study, StudyStatus, create_token, session_factory
from service.db.testing import temporary_database
from tests.api_fixtures import FakeController, make_settings, write_export

EXAMPLE_ID = "a1b2c3d4e5f6"  # the id in the schema's examples
TOKEN: dict[str, str] = {}
MAX_EXAMPLES = 15
# Not positive_data_acceptance: a schema-valid spec is still refused (422) when its models
# do not exist under the model roots, which no JSON schema can express.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live_app(request, tmp_path_factory, model_root):
    tmp = tmp_path_factory.mktemp(f"schema-{request.param}")
    with temporary_database(request.param, tmp) as url:
        app = create_app(make_settings(url, tmp, model_root, auth=True), start_controller=False,
                         poll_seconds=0.01)
        with TestClient(app):  # runs the start-up: migrations, engine
            ctl = FakeController(url)
            with session_factory(ctl.engine).begin() as s:
                TOKEN["value"] = create_token(s, "schemathesis")
                s.add(Study(id=EXAMPLE_ID, name="example", status=StudyStatus.COMPLETED,
                            spec={"spec": {"name": "example", "budget": {"max_trials": 3}}}))
            for n, fit in enumerate([0.1, 0.7]):
                ctl.add_trial(EXAMPLE_ID, n, fit)
            folder, manifest = write_export(tmp / "exports", "e" * 64, {"README.md": b"# card\n"})
            with session_factory(ctl.engine).begin() as s:
                s.add(Artifact(study_id=EXAMPLE_ID, trial_number=1, kind="export", path=str(folder),
                               state=ArtifactState.READY, sha256=manifest["archive_sha256"],
                               size_bytes=manifest["archive_size"], export_key=manifest["key"]))
            yield schemathesis.openapi.from_asgi("/openapi.json", app)
            ctl.close()


def test_api_conforms_to_its_schema(live_app):
    """Every operation, ``MAX_EXAMPLES`` generated cases each (plus the schema's examples)."""
    headers = {"Authorization": f"Bearer {TOKEN['value']}"}
    operations = [result.ok() for result in live_app.get_all_operations()]
    # reads first, DELETE last: the example study must exist while the reads run
    operations.sort(key=lambda op: {"GET": 0, "POST": 1, "DELETE": 2}[op.method.upper()])
    assert len(operations) == 20, [op.label for op in operations]
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    for operation in operations:

        label = operation.label

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], database=None)
        def check(case):
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            assert response.status_code < 500, response.text
            seen.setdefault(label, set()).add(response.status_code)  # noqa: B023 (runs in this iteration)

        try:
            if "{study_id}" in label and operation.method.upper() == "GET":
                # the example study, always (generation alone may never hit an existing id)
                params = {"study_id": EXAMPLE_ID, "number": 1, "export_id": 1, "name": "README.md"}
                case = operation.Case(path_parameters={k: v for k, v in params.items()
                                                       if f"{{{k}" in label})
                response = case.call_and_validate(headers=headers, checks=CHECKS)
                assert response.status_code < 500, response.text
                seen.setdefault(label, set()).add(response.status_code)
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(seen) == len(operations)
    ok = {label for label, codes in seen.items() if any(200 <= c < 300 for c in codes)}
    assert {"GET /health", "GET /studies", "GET /studies/{study_id}"} <= ok, seen  # not only refusals


# ---- deeper: negative data, and what an attacker sends -------------------------------------------
DEEP = 100_000
HOSTILE_BODIES: dict[str, bytes] = {
    "nested 1000": b"[" * 1000 + b"]" * 1000,
    "nested 100000 in a field": b'{"name": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "nested object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "huge integer": b'{"name": "x", "seed": ' + b"9" * 5000 + b"}",
    "huge float": b'{"name": "x", "seed": 1e999999}',
    "surrogate pair": b'{"name": "\\ud83e\\uddea"}',
    "lone surrogate": b'{"name": "\\ud83e"}',
    "NUL": b'{"name": "a\\u0000b"}',
    "invalid UTF-8": b'{"name": "\xff\xfe"}',
    "bidi and zero width": '{"name": "\u202e\u200b\ufeff x"}'.encode(),
    "10 MB array": b"[" + b"0," * 5_000_000 + b"0]",
    "yaml alias bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                       b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                       b"d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
}
HOSTILE_HEADERS: dict[str, dict[str, Any]] = {
    "range digits": {"Range": "bytes=" + "9" * 5000 + "-"},
    "range suffix digits": {"Range": "bytes=-" + "9" * 5000},
    "last event id digits": {"Last-Event-ID": "9" * 5000},
    "if-range junk": {"If-Range": b"\xff" * 100, "Range": "bytes=0-1"},
}
HOSTILE_QUERIES: dict[str, dict[str, str]] = {
    "huge offset": {"offset": "9" * 5000, "limit": "9" * 5000},
    "unicode": {"name": "\U0001f9ea\u202e\u200b", "owner": "x" * 5000},
    "negative": {"after": "-1", "offset": "-5"},
}


def test_api_survives_negative_and_hostile_inputs(live_app):
    """Every operation gets schema-violating cases (schemathesis' negative mode) and a fixed set
    of hostile bodies, headers and queries (deep nesting, huge integers, invalid and odd Unicode,
    a 10 MB body, digits beyond Python's int limit): never a 5xx."""
    headers = {"Authorization": f"Bearer {TOKEN['value']}"}
    operations = [result.ok() for result in live_app.get_all_operations()]
    operations.sort(key=lambda op: {"GET": 0, "POST": 1, "DELETE": 2}[op.method.upper()])
    failures: list[str] = []
    app = live_app.app
    with TestClient(app, raise_server_exceptions=False) as client:
        for operation in operations:
            label = operation.label

            @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.generate], database=None)
            def negative(case):
                response = case.call(headers=headers)
                assert response.status_code < 500, response.text[:500]

            try:
                negative()
            except Unsatisfiable:
                pass  # nothing of it can be made invalid (GET /health takes no input)
            except Exception as exc:
                failures.append(f"{label} (negative): {exc}")
            params = {"study_id": EXAMPLE_ID, "number": "1", "export_id": "1", "name": "README.md"}
            path = operation.path
            for key, value in params.items():
                path = path.replace(f"{{{key}}}", value)
            method = operation.method.upper()
            if method == "DELETE":
                continue  # the example study must stay for the other operations
            sends: list[tuple[str, dict[str, Any]]] = []
            sends += [(f"header {n}", {"headers": {**headers, **h}}) for n, h in HOSTILE_HEADERS.items()]
            sends += [(f"query {n}", {"headers": headers, "params": q}) for n, q in HOSTILE_QUERIES.items()]
            if method == "POST":
                for n, body in HOSTILE_BODIES.items():
                    kind = "application/yaml" if "yaml" in n else "application/json"
                    sends.append((f"body {n}",
                                  {"headers": {**headers, "Content-Type": kind}, "content": body}))
            for what, kwargs in sends:
                if path.endswith("/events") and "header" not in what:
                    continue  # a stream: its query is covered by the negative cases
                response = client.request(method, path, **kwargs)
                if response.status_code >= 500:
                    failures.append(f"{label} {what}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n\n".join(failures)
