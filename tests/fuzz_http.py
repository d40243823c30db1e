"""Fuzzing the HTTP API: arbitrary bodies and query strings through the node's ASGI
router, no server.

``call_app`` plays an HTTP client towards the router itself (a fake ``receive`` that hands
over the body in pieces, a ``send`` that collects the answer), so every handler and
``Request.json`` see exactly what hypercorn would give them. What must hold for any
body: the answer is a 2xx, or a 4xx with a one-line JSON ``{"error": ...}``; never the
router's 500 for an unexpected exception, never an exception out of the app, never a
hang (each call is bounded by ``trio.fail_after``). A 2xx NDJSON stream must be JSON lines.

The hypothesis engine is synchronous and the node lives in a trio loop, so the engine
runs in a worker thread and each example is sent back to the loop with
``trio.from_thread.run`` (see ``run_http_fuzz``).
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from node.http import Router
from tests.fuzz_mutations import byte_mutated
from tests.fuzz_targets import ACCEPTED, REFUSED, Finding, Hang

# Seconds one request may take. A pull of an unknown model with no peers answers at once;
# the handlers' own waits (DHT lookups) are bounded well below this.
HTTP_BUDGET = 30.0

_KEYS = ["model", "name", "stream", "insecure", "source", "destination", "glob", "timeout"]
_VALID_BODIES = [
    b'{"model": "llama3:8b", "stream": false}',
    b'{"name": "registry.ollama.ai/library/llama3:latest"}',
    b'{"model": "ns/model:tag", "stream": true, "insecure": true}',
    b"{}",
]
_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["llama3", "a" * 300, "../../etc", "x:y:z", "\x00", "ns/m:t", "sha256:00"]),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8)), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from(_VALID_BODIES).flatmap(byte_mutated),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=4).map(
        lambda v: json.dumps(v).encode()
    ),
    # Hostile shapes a byte mutation would never reach.
    st.integers(1, 200_000).map(lambda n: b"[" * n),
    st.integers(1, 50_000).map(lambda n: b'{"model":' * n),
    st.sampled_from([b'{"model": 1e999}', b'{"model": "' + b"9" * 5000 + b'"}', b"\xff\xfe{"]),
)


@dataclass(frozen=True, slots=True)
class HttpCase:
    method: str
    path: str
    body: bytes
    piece: int  # the body arrives in pieces of this size
    disconnect: bool  # the client goes away after sending the body
    query: bytes = b""


def body_routes(router: Router, *, methods: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(method, path) of every route with no path parameters that takes a body (or, with
    ``methods``, that has one of those methods).

    Read from the router itself, so routes added later are fuzzed without a change here.
    """
    routes = []
    for method, regex, _ in router._routes:
        wanted = method in methods if methods else method not in ("GET", "HEAD")
        if wanted and not regex.groups:
            routes.append((method, regex.pattern.rstrip("$")))
    return routes


_QUERY_KEYS = ["glob", "timeout", "model", "name", "limit"]
QUERIES: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(_QUERY_KEYS),
            st.one_of(
                st.text(max_size=300),
                st.sampled_from(["*", "llama*", "[", "0", "-1", "1e999", "nan", "inf", "0.05"]),
            ),
        ),
        max_size=4,
    ).map(lambda pairs: urllib.parse.urlencode(pairs).encode()),
    # A valid glob with each odd timeout: the number is the part most likely to break.
    st.sampled_from(["", "0", "-1", "1e999", "-1e999", "nan", "NaN", "inf", "0x10", "1_0"]).map(
        lambda t: f"glob=*&timeout={t}".encode()
    ),
)


def cases(routes: list[tuple[str, str]]) -> st.SearchStrategy[HttpCase]:
    # A few unknown routes and wrong methods: the router's own refusals must hold too.
    targets = [*routes, ("POST", "/api/nope"), ("PUT", "/api/pull"), ("DELETE", "/")]
    # Any path at all, which also reaches routes with path parameters.
    anywhere = st.builds(
        HttpCase,
        method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
        path=st.one_of(
            st.text(max_size=80).map(lambda t: "/" + t),
            st.sampled_from([p for _, p in routes]).map(lambda p: p + "/x"),
            st.sampled_from(["/api/", "//", "/api/pull/", "/../api/tags", "/api/tags\x00"]),
        ),
        body=BODIES,
        piece=st.integers(1, 4096),
        disconnect=st.booleans(),
        query=QUERIES,
    )
    return anywhere | st.sampled_from(targets).flatmap(
        lambda target: st.builds(
            HttpCase,
            method=st.just(target[0]),
            path=st.just(target[1]),
            body=BODIES if target[0] not in ("GET", "HEAD") else st.just(b""),
            piece=st.integers(1, 4096),
            disconnect=st.booleans(),
            query=QUERIES,
        )
    )


async def call_app(app: Router, case: HttpCase) -> tuple[int, bytes]:
    """One request through the ASGI app; (status, body). Raises ``Finding`` on a bad answer."""
    pieces = [case.body[i : i + case.piece] for i in range(0, len(case.body), case.piece)] or [b""]
    inbox: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []
    gone = trio.Event()

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        if case.disconnect:
            return {"type": "http.disconnect"}
        await gone.wait()  # as hypercorn does: the next message is the disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": case.method,
        "path": case.path,
        "query_string": case.query,
        "headers": [(b"content-type", b"application/json")],
    }
    try:
        with trio.fail_after(HTTP_BUDGET):
            await app(scope, receive, send)
    except trio.TooSlowError:
        raise Hang(f"{case.method} {case.path} gave no answer in {HTTP_BUDGET:g}s") from None
    except Exception as exc:
        raise Finding(f"{case.method} {case.path}: the app raised {exc!r}") from exc
    finally:
        gone.set()
    return _check_answer(case, sent)


def _error_message(path: str, answer: Any) -> Any:
    """The error's message: Ollama's ``{"error": ...}``, or under ``/v2/`` the OCI
    distribution spec's ``{"errors": [{"code", "message", ...}]}``."""
    if path.startswith("/v2/") and "errors" in answer:
        first = answer["errors"][0]
        if not isinstance(first["code"], str):
            raise TypeError("an OCI error code is a string")
        return first["message"]
    return answer["error"]


def _check_answer(case: HttpCase, sent: list[dict[str, Any]]) -> tuple[int, bytes]:
    where = f"{case.method} {case.path}"
    if not sent or sent[0].get("type") != "http.response.start":
        raise Finding(f"{where}: no response started")
    status = int(sent[0]["status"])
    body = b"".join(m.get("body", b"") for m in sent[1:])
    if sent[-1].get("more_body", False):
        raise Finding(f"{where}: the response never ended")
    if case.method == "HEAD":
        if body:
            raise Finding(f"{where}: a HEAD answer with a body: {body[:200]!r}")
        return status, body
    if status >= 400:
        try:
            error = _error_message(case.path, json.loads(body))
        except (ValueError, KeyError, TypeError, IndexError):
            raise Finding(f"{where}: {status} without a JSON error: {body[:200]!r}") from None
        if not isinstance(error, str) or "\n" in error:
            raise Finding(f"{where}: {status} error is not one line: {error!r:.200}")
        # The router's answer to an exception no handler expected (a 5xx of the handler's
        # own choosing, e.g. a pull that failed upstream, is an answer, not a crash).
        if error.startswith("internal error"):
            raise Finding(f"{where}: {status} {error!r:.300}")
        return status, body
    content_type = dict(sent[0]["headers"]).get(b"content-type", b"")
    if content_type.startswith(b"application/x-ndjson"):
        for line in body.splitlines():
            try:
                json.loads(line)
            except ValueError:
                raise Finding(f"{where}: NDJSON line is not JSON: {line[:200]!r}") from None
    return status, body


def run_http_fuzz(
    app: Router,
    *,
    examples: int,
    derandomize: bool,
    random_seed: int | None = None,
    counts: Counter[str] | None = None,
    on_failure: Callable[[HttpCase, BaseException], None] | None = None,
) -> Counter[str]:
    """Run the hypothesis search **in a worker thread** of a trio run that serves ``app``.

    Each example is executed in the trio loop through ``trio.from_thread.run``. Counts
    answers as ``accepted`` (2xx) or ``refused`` (4xx); raises the first finding.
    """
    counts = Counter() if counts is None else counts

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(cases(body_routes(app) + body_routes(app, methods=("GET",))))
    def fuzz(case: HttpCase) -> None:
        try:
            status, _ = trio.from_thread.run(call_app, app, case)
        except BaseException as exc:
            if on_failure is not None:
                on_failure(case, exc)
            raise
        counts[REFUSED if status >= 400 else ACCEPTED] += 1

    if random_seed is not None:
        fuzz = seed(random_seed)(fuzz)
    fuzz()
    return counts
