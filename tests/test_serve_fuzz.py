"""A schemathesis run over the server's OpenAPI schema: no request it generates may get a 5xx, and every
response must be one the schema documents: its status, its content type and its body (each server-sent
event of a stream too; serving/openapi.py). The schema's request examples (`model: auto`) reach answers,
streamed ones included, not only refusals."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from test_serve import build_bank

pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install schemathesis)")

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_no_server_errors_and_responses_as_documented_under_schemathesis(tmp_path_factory):
    bank = build_bank(tmp_path_factory.mktemp("serve-fuzz"))
    settings = ServeSettings(auth={"keys": [{"name": "fuzz", "key": "sk-fuzz", "scopes": ["admin"]}]},
                             limits={"requests_per_minute": 100_000, "tokens_per_minute": 10_000_000},
                             generation={"default_max_tokens": 2, "max_tokens_limit": 4}, http={"max_k": 8})
    with serve_in_thread(create_app(settings, bank)) as url:
        command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
                   "--checks", CHECKS, "-H", "Authorization: Bearer sk-fuzz",
                   "--max-examples", "30", "--generation-deterministic", "--request-timeout", "60",
                   "--suppress-health-check", "all"]
        if not Path(command[0]).exists():
            command[0] = shutil.which("schemathesis") or "schemathesis"
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
