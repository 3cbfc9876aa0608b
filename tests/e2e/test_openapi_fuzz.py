"""Schemathesis against the real server's own OpenAPI description (FastAPI's /openapi.json): no 5xx, ever.

Every operation it describes (health, metadata, infer with its JSON body, TorchServe predictions,
management, metrics) gets a bounded number of generated requests, valid and invalid alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.conftest import Package, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXAMPLES = 10  # per operation and plan: 10 requests, 30 for those with a body


@pytest.fixture(scope="module")
def described(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("openapi") / "serve.log"
    server = start_server(demo_package.store, log, "--max-payload-bytes", "1000000")
    yield server
    assert server.stop() == 0, log.read_text()
    assert "Traceback" not in log.read_text(), "a generated request reached an unexpected error inside the server"


@pytest.fixture(scope="module")
def openapi(described: Server) -> Any:
    return schemathesis.openapi.from_url(f"{described.url}/openapi.json")


def test_no_request_makes_a_server_error(openapi: Any) -> None:
    """Generated requests for every operation; each failure is collected, then all are reported.

    Operations with a request body get valid bodies (for random model names, and for the real
    model, so that decoding and inference run) and invalid ones; the others get valid requests
    (an invalid path parameter cannot be put in a URL). Schemathesis' own pytest integration
    (``from_fixture``) does not run under this pytest, so the loop is explicit.
    """
    failures: list[str] = []
    operations = [result.ok() for result in openapi.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        for mode, path in _plans(operation):
            try:
                _fuzz(operation, mode, path)
            except Exception as exc:  # a failed check: reported with all the others
                failures.append(f"{operation.label} ({mode.value}, {path or 'random path'}): {exc}")
    assert not failures, "\n\n".join(failures)


def _plans(operation: Any) -> list[tuple[GenerationMode, dict[str, str]]]:
    if not operation.get_request_payload_content_types():
        return [(GenerationMode.POSITIVE, {})]
    real = {"model": "demo", **({"version": "1"} if "{version}" in operation.path else {})}
    return [(GenerationMode.POSITIVE, {}), (GenerationMode.POSITIVE, real), (GenerationMode.NEGATIVE, real)]


def _fuzz(operation: Any, mode: GenerationMode, path: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path or None))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # bounded: no shrinking, the failing request is reported as is
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    run()


def test_the_description_has_the_request_bodies(openapi: Any, described: Server) -> None:
    """The infer and predictions routes read the raw request, so their bodies are described by hand."""
    import httpx

    paths = httpx.get(f"{described.url}/openapi.json").json()["paths"]
    infer = paths["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]
    assert infer["application/json"]["schema"]["required"] == ["inputs"]
    assert "application/octet-stream" in infer
    for method in ("post", "put"):
        predictions = paths["/predictions/{model}"][method]["requestBody"]["content"]
        assert {"application/octet-stream", "multipart/form-data"} <= set(predictions)
