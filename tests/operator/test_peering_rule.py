"""The rule by which a delayed reconcile stands by: Kopf's own, for the peers in a peering object's status."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from neuronmodel_operator.peering import outranking_peers

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def peer(priority: int, seen_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_live_peers_of_higher_or_equal_priority_outrank_and_others_do_not() -> None:
    peers = {
        "me": peer(100, 0),
        "higher": peer(200, 10),
        "tie": peer(100, 59),  # Kopf pauses every replica on a tie
        "lower": peer(50, 0),
        "dead-higher": peer(300, 61),
        "short-lived": peer(300, 11, lifetime=10),
    }
    assert sorted(outranking_peers(peers, "me", 100, NOW)) == ["higher", "tie"]


def test_a_replica_alone_or_among_lower_ones_is_never_outranked() -> None:
    assert list(outranking_peers({}, "me", 100, NOW)) == []
    assert list(outranking_peers({"me": peer(100, 0), "lower": peer(1, 0)}, "me", 100, NOW)) == []


def test_a_peer_that_never_said_when_it_was_seen_counts_as_seen_now_as_kopf_reads_it() -> None:
    assert list(outranking_peers({"quiet": {"priority": 500}}, "me", 100, NOW)) == ["quiet"]
