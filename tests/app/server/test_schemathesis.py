"""schemathesis reads the server's own OpenAPI schema and throws generated requests at
every operation (valid ones and, in its negative mode, ones that break the schema: wrong
types, missing fields, out-of-range numbers): none may answer with a 5xx. It finds what
hand-written error tests miss (a null where a list is expected, a huge integer, an empty
object), over real HTTP against the live server.

The operations are driven here with hypothesis directly (``APIOperation.as_strategy``)
rather than ``schemathesis.pytest.from_fixture``, whose lazy loading breaks on the
pytest this project pins."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.app.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = 20  # per operation and mode: the tiny model answers each in milliseconds


def test_no_generated_request_gets_a_server_error(live):
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= paths, paths
    for op in operations:
        # A request breaking the schema needs something to break: a body (any string is a
        # valid path parameter).
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)

            check()
