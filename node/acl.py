"""Access control per model: which peer may read, replicate or publish which models.

Rules come from ``[[access]]`` in node.toml (``node.config.AccessRule``). With no rule at
all every peer may do everything, so an open swarm needs no configuration. Once a rule
exists, a peer may do only what some rule grants it; this node itself may always do
everything (its operator is the one writing the rules).

- ``reader``: list the model, fetch its version records, manifest, chunk lists and blocks.
- ``replicator``: may be asked to hold a copy (``/dmm/replicate/1`` calls ``allowed``).
- ``publisher``: version records *signed by* the peer (``record.author``) for the model are
  accepted: by the version book, the DHT validator and the gossip validator alike, so a
  record from a non-publisher goes no further than the first node that checks it.

Models are matched by ``protocols.catalog.glob_matches`` on ``name:tag`` as people type
it (``llama3:8b``, ``ns/model:tag``); a glob without a tag matches every tag.

``StoreAccess`` answers the reader questions the catalog and block servers ask about blobs
and manifests, which name no model: a blob may be read when some model in the store that
the peer may read references it. It is blocking (it reads the store) and thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Literal

from node.config import ROLES, AccessRule
from protocols.catalog import glob_matches
from protocols.errors import LocalProtocolError
from storage.names import InvalidName, parse_model_name

if TYPE_CHECKING:
    from node.audit import AuditLog
    from protocols.records import VersionRecord
    from storage.store import ModelStore

__all__ = ["ROLES", "Acl", "Role", "StoreAccess", "display_model"]

log = logging.getLogger("dmm.acl")

Role = Literal["reader", "replicator", "publisher"]

# StoreAccess re-reads the store's model list at most this often (a pull or an add shows
# up within this long; a miss re-reads at once, rate-limited by the same interval).
_LISTING_TTL: Final = 2.0
_MISS_RELOAD: Final = 0.2


def display_model(model: str) -> str | None:
    """``name:tag`` as globs see it, from any form of a model name; None if invalid."""
    try:
        return parse_model_name(model).display
    except (InvalidName, LocalProtocolError):
        return None


class Acl:
    """The ``[[access]]`` rules of one node. Immutable, so safe from any thread."""

    def __init__(self, rules: Iterable[AccessRule], *, self_peer: str | None = None) -> None:
        self.rules = tuple(rules)
        self.self_peer = self_peer

    @property
    def open(self) -> bool:
        """True when there are no rules: every peer may do everything."""
        return not self.rules

    def allowed(self, peer: str, role: Role, model: str) -> bool:
        """May ``peer`` act as ``role`` on ``model`` (any name form, with or without tag)?"""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
        if not self.rules or peer == self.self_peer:
            return True
        name = display_model(model)
        if name is None:
            return False
        for rule in self.rules:
            if role not in rule.roles:
                continue
            if "*" not in rule.peers and peer not in rule.peers:
                continue
            if glob_matches(rule.models, name):
                return True
        return False

    def may_publish(self, record: VersionRecord) -> bool:
        """Whether ``record``'s author holds the publisher role for its model."""
        return self.allowed(record.author, "publisher", record.name)

    def publish_refusal(self, record: VersionRecord) -> str | None:
        """None when ``record`` may be accepted, else the reason in one line."""
        if self.may_publish(record):
            return None
        return f"author {record.author} lacks the publisher role for {record.name}"


class StoreAccess:
    """Reader checks for requests that name a blob or a manifest digest, over the store."""

    def __init__(self, acl: Acl, store: ModelStore, audit: AuditLog | None = None) -> None:
        self.acl = acl
        self.store = store
        self.audit = audit
        self._lock = threading.Lock()
        self._stamp = -_LISTING_TTL
        self._blob_models: dict[str, set[str]] = {}
        self._manifest_models: dict[str, set[str]] = {}

    def _listing(self, digest: str, table: Literal["blob", "manifest"]) -> set[str]:
        """Names of the models in the store that reference ``digest``."""
        with self._lock:
            now = time.monotonic()
            found = self._table(table).get(digest)
            age = now - self._stamp
            # A miss may be a model pulled a moment ago: look again, but not on every miss.
            if age > _LISTING_TTL or (found is None and age > _MISS_RELOAD):
                self._reload(now)
                found = self._table(table).get(digest)
            return set(found or ())

    def _table(self, table: Literal["blob", "manifest"]) -> dict[str, set[str]]:
        return self._blob_models if table == "blob" else self._manifest_models

    def _reload(self, now: float) -> None:
        blobs: dict[str, set[str]] = {}
        manifests: dict[str, set[str]] = {}
        for entry in self.store.list_models():
            name = entry.name.display
            manifests.setdefault(entry.digest, set()).add(name)
            for digest in entry.manifest.blob_digests():
                blobs.setdefault(digest, set()).add(name)
        self._blob_models, self._manifest_models, self._stamp = blobs, manifests, now

    def _refuse(self, peer: str, what: str, models: set[str], action: str) -> str:
        shown = ", ".join(sorted(models)[:3]) or "no model held here"
        reason = f"peer {peer} may not read {what} ({shown})"
        log.info("refused %s to %s: %s", action, peer, reason)
        if self.audit is not None:
            self.audit.record(
                action,
                peer=peer,
                model=min(models) if models else None,
                outcome="refused",
                reason="not a reader",
            )
        return reason

    def model_refusal(self, peer: str, model: str, action: str = "catalog") -> str | None:
        """None when ``peer`` may read ``model``, else a one-line reason (audited)."""
        if self.acl.allowed(peer, "reader", model):
            return None
        name = display_model(model) or model[:80]
        return self._refuse(peer, f"model {name}", {name}, action)

    def may_read_blob(self, peer: str, digest: str) -> bool:
        """Unaudited: used to filter answers (a chunk in an unreadable blob is "not had")."""
        if self.acl.open or peer == self.acl.self_peer:
            return True
        return any(self.acl.allowed(peer, "reader", m) for m in self._listing(digest, "blob"))

    def blob_refusal(self, peer: str, digest: str, action: str = "fetch") -> str | None:
        if self.may_read_blob(peer, digest):
            return None
        return self._refuse(peer, f"blob {digest[:19]}", self._listing(digest, "blob"), action)

    def manifest_refusal(self, peer: str, digest: str, action: str = "catalog") -> str | None:
        if self.acl.open or peer == self.acl.self_peer:
            return None
        models = self._listing(digest, "manifest")
        if any(self.acl.allowed(peer, "reader", m) for m in models):
            return None
        return self._refuse(peer, f"manifest {digest[:19]}", models, action)
