"""The session's OCI registry: one ``docker-registry`` for every test that asks for it.

Missing or broken, it fails the tests that need it with what to do (``scripts/test``
installs it); it never skips them silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.testregistry import OciRegistry, RegistryUnavailable, run_oci_registry


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    try:
        with run_oci_registry(tmp_path_factory.mktemp("oci-registry")) as registry:
            yield registry
    except RegistryUnavailable as exc:
        pytest.fail(str(exc))
