"""Short CI pass of the HTTP API fuzz (tests/fuzz_http.py) against a real node's router."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from node.api import build_router
from node.daemon import open_node
from node.testing import node_config
from tests.fuzz_http import HttpCase, body_routes, call_app, run_http_fuzz
from tests.fuzz_targets import ACCEPTED, REFUSED

CI_EXAMPLES = 200


async def test_api_bodies_get_an_answer_or_a_4xx_json_error(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with open_node(node_config(tmp_path, "fuzzed")) as node:
            router = build_router(node)
            assert ("POST", "/api/pull") in body_routes(router)
            counts = await trio.to_thread.run_sync(
                lambda: run_http_fuzz(router, examples=CI_EXAMPLES, derandomize=True)
            )
    assert counts[ACCEPTED] > 0 and counts[REFUSED] > 0, counts


async def test_what_the_fuzzer_found_is_answered_with_one_line_4xx(tmp_path: Path) -> None:
    """Each of these was answered as a 500 "internal error", or broke the one-line rule."""
    found = [
        # json.loads raised RecursionError.
        (HttpCase("POST", "/api/pull", b"[" * 100_000, 4096, False), 400, "nested too deeply"),
        # float("nan") passed the clamp, and trio refuses a NaN deadline.
        (
            HttpCase("GET", "/api/find", b"", 1, False, b"glob=*&timeout=nan"),
            400,
            "timeout must be a number",
        ),
        # hypercorn decodes %0A in a path; the 404 quoting it went out as two lines.
        (HttpCase("GET", "/a\nb\r\x00", b"", 1, False), 404, "GET /a\\nb\\r\\x00"),
    ]
    with trio.fail_after(60):
        async with open_node(node_config(tmp_path, "found")) as node:
            router = build_router(node)
            for case, status, error in found:
                got, body = await call_app(router, case)
                assert got == status and error in json.loads(body)["error"], (case, body)
