"""Short CI pass of the HTTP API fuzz (tests/fuzz_http.py) against a real node's router."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from node.api import build_router
from node.daemon import open_node
from node.http import Router
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


async def _answer(router: Router, body: bytes, path: str = "/api/pull") -> tuple[int, bytes]:
    with trio.fail_after(30):
        return await call_app(router, HttpCase("POST", path, body, 4096, False))


async def test_deeply_nested_json_body_is_a_400(tmp_path: Path) -> None:
    # Found by the fuzzer: json.loads raised RecursionError, answered as a 500 "internal error".
    with trio.fail_after(60):
        async with open_node(node_config(tmp_path, "nested")) as node:
            status, body = await _answer(build_router(node), b"[" * 100_000)
    assert status == 400 and b"nested too deeply" in body


async def test_find_with_a_nan_timeout_is_a_400(tmp_path: Path) -> None:
    # Found by the fuzzer: float("nan") passed the clamp and trio refused the NaN deadline,
    # answered as a 500 "internal error".
    with trio.fail_after(60):
        async with open_node(node_config(tmp_path, "nan")) as node:
            case = HttpCase("GET", "/api/find", b"", 1, False, b"glob=*&timeout=nan")
            status, body = await call_app(build_router(node), case)
    assert status == 400 and b"timeout must be a number" in body


async def test_error_for_a_path_with_a_newline_is_one_line(tmp_path: Path) -> None:
    # Found by the fuzzer: hypercorn decodes %0A in the path, and "no such endpoint: GET
    # /a<newline>b" went out as a two-line error.
    with trio.fail_after(60):
        async with open_node(node_config(tmp_path, "newline")) as node:
            case = HttpCase("GET", "/a\nb\r\x00", b"", 1, False)
            status, body = await call_app(build_router(node), case)
    assert status == 404
    assert json.loads(body)["error"] == "no such endpoint: GET /a\\nb\\r\\x00"
