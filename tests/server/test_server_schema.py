"""The server against its own OpenAPI schema: a bounded schemathesis run over loopback, zero 5xx, zero violations.

Every correctness check runs except ``positive_data_acceptance``: some schema-valid requests are refused on
purpose with a 400 the schema cannot express (max_new_tokens a multiple of block_size, prompt plus tokens within
the context, the KV cache budget, a prompt holding the mask token, max_tokens given twice). The model has a
32-position context so that no generated request takes long.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.server.limits import ServerLimits
from lopa.testing import make_tiny_checkpoint

pytest.importorskip("schemathesis")
CHECKS = (  # every correctness check (response time is not one: a busy machine is slow)
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
)
HANG_GUARD_S = 180  # bounded by --max-examples (~20 s on a loaded 2-core machine); this only stops a hang


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("schema") / "short", max_position_embeddings=32)
    app = create_app(
        LLM(path), default_config=DecodeConfig(block_size=8, max_new_tokens=8), limits=ServerLimits(max_branches=4)
    )
    with serve_in_background(app) as url:
        yield url


def test_schema_declares_what_the_server_answers(base_url) -> None:
    schema = httpx.get(base_url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "503"} <= set(responses) and "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]
        assert "Retry-After" in responses["503"]["headers"]
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert all(option.get("minLength", option.get("minItems")) == 1 for option in request["prompt"]["anyOf"])
    lopa = request["lopa"]["anyOf"][0]
    assert lopa["additionalProperties"] is False and lopa["properties"]["branches"]["maximum"] == 4


def test_schemathesis_finds_no_server_error_and_no_violation(base_url, tmp_path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st is not None, "schemathesis' st command is not installed"
    command = [
        st,
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "15",
        "--phases",
        "examples,fuzzing",  # the exhaustive coverage phase takes minutes on a busy machine
        "--seed",
        "1",
        "--request-timeout",
        "20",
        "--output-sanitize",
        "false",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)  # its cache
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated is not None and generated.group(1) == generated.group(2), report
    assert int(generated.group(1)) >= 40, report  # the run really exercised the API
