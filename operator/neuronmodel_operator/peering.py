"""Whether this replica may act, for the reconciles that Kopf does not start itself.

With several replicas Kopf pauses every one but the replica of highest priority: it closes their watch streams
and starts no handler. Retries and requeues run on timers outside Kopf, so one scheduled before a pause would
still fire and write from indexes that no longer follow the cluster. Before it acts, it asks Kopf's question again
from the peering object: is a live replica of higher or equal priority there? (Kopf pauses every replica on a tie.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf
from kopf._core.engines.peering import detect_own_id  # Kopf's own identity rule (POD_ID, or user@host/time/rnd)
from kubernetes import client
from kubernetes.client.rest import ApiException

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
IDENTITY = detect_own_id(manual=False)  # handed to kopf.run, so both name this replica the same way
DEFAULT_LIFETIME = 60  # seconds; what Kopf assumes when a peer does not say


def outranking_peers(
    peers: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: datetime
) -> Iterator[str]:
    """The live peers for which Kopf pauses the replica ``identity``: those of higher or equal priority."""
    for peer, info in peers.items():
        lifetime = timedelta(seconds=int(info.get("lifetime", DEFAULT_LIFETIME)))
        lastseen = datetime.fromisoformat(info["lastseen"]) if "lastseen" in info else now  # Kopf: seen now
        alive = lastseen + lifetime > now
        if peer != identity and alive and int(info.get("priority", 0)) >= priority:
            yield peer


@dataclass(frozen=True)
class Peering:
    """This replica in its peering: the object's name, its scope and the replica's priority."""

    name: str
    priority: int
    clusterwide: bool
    identity: str = IDENTITY

    @classmethod
    def of(cls, settings: kopf.OperatorSettings) -> Peering | None:
        """None for a standalone replica: nothing can pause it."""
        if settings.peering.standalone:
            return None
        return cls(settings.peering.name, settings.peering.priority, settings.peering.clusterwide)

    def outranked_in(self, namespace: str, custom: client.CustomObjectsApi, timeout: Any) -> list[str]:
        """The peers that make Kopf pause this replica for ``namespace``'s peering; [] when it may act (also when
        there is no peering object: Kopf then runs every replica)."""
        try:
            if self.clusterwide:
                obj = custom.get_cluster_custom_object(
                    PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", self.name, _request_timeout=timeout
                )
            else:
                obj = custom.get_namespaced_custom_object(
                    PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", self.name, _request_timeout=timeout
                )
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        peers = obj.get("status") or {}
        return list(outranking_peers(peers, self.identity, self.priority, datetime.now(timezone.utc)))
