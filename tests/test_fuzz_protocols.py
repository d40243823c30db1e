"""Short CI pass of the fuzz targets (tests/fuzz_targets.py); `scripts/fuzz` runs the long one.

Every decoder a peer can reach, fed arbitrary bytes and mutated valid encodings, must
accept or raise its typed error — nothing else, and never hang. Derandomized so CI sees
the same inputs every run; regression tests pin what earlier runs found.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings

from storage.manifest import ManifestError, parse_manifest
from tests.fuzz_targets import (
    ACCEPTED,
    REFUSED,
    TARGETS,
    Hang,
    Target,
    check,
    time_budget,
)

CI_EXAMPLES = 200


@pytest.mark.parametrize("target", list(TARGETS.values()), ids=list(TARGETS))
def test_decoder_accepts_or_refuses_with_its_typed_error(target: Target) -> None:
    outcomes: Counter[str] = Counter()

    def fuzz(value: Any) -> None:
        outcomes[check(target, value)] += 1

    run = given(target.strategy)(fuzz)
    if target.valid is not None:
        run = example(target.valid)(run)
    settings(
        max_examples=CI_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )(run)()
    # Both outcomes seen: the mutations reach past the first check, and valid-looking
    # inputs still get through (a target that refuses everything tests nothing).
    assert outcomes[REFUSED] > 0 and outcomes[ACCEPTED] > 0, outcomes


def test_time_budget_stops_an_endless_loop() -> None:
    with pytest.raises(Hang), time_budget(0.05):
        while True:
            pass


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_manifest_is_refused_not_a_crash(depth: int) -> None:
    # Found by the fuzzer: json.loads raised RecursionError, which no caller catches, so a
    # peer publishing "[[[[..." as its manifest crashed the pull instead of failing it.
    with pytest.raises(ManifestError, match="nested too deeply"):
        parse_manifest(b"[" * depth)


def test_scripts_fuzz_prints_counts_and_exits_1_with_the_reproducer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hypothesis import strategies as st

    from tests import fuzz_run

    def brittle(data: bytes) -> str:
        if b"\x07" in data:
            raise KeyError("not a typed error")
        return REFUSED if data else ACCEPTED

    monkeypatch.setitem(TARGETS, "brittle", Target("brittle", "test", st.binary(), brittle))
    assert fuzz_run.main(["--examples", "200", "--seed", "1", "brittle", "cbor"]) == 1
    out, err = capsys.readouterr()
    assert "FINDING in brittle" in err and "input: b'\\x07'" in err and "KeyError" in err
    [brittle_row] = [line.split() for line in out.splitlines() if line.startswith("brittle")]
    [cbor_row] = [line.split() for line in out.splitlines() if line.startswith("cbor")]
    assert brittle_row[-1] == "FINDING" and cbor_row[-1] == "ok"
    assert int(cbor_row[1].replace(",", "")) >= 200
    assert fuzz_run.main(["no-such-target"]) == 2
