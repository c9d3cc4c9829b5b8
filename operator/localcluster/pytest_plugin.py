"""Pytest fixtures: one local control plane per session, a fresh namespace per test.

A control plane that cannot be built or started is an error of every test that needs it, never a skip.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from .images import Image, ensure_images
from .simcluster import SimulatedCluster


@pytest.fixture(scope="session")
def built_images() -> dict[str, Image]:
    """The project's images for the current sources (built once, cached outside the work tree)."""
    return ensure_images()


@pytest.fixture(scope="session")
def cluster(built_images: dict[str, Image]) -> Iterator[SimulatedCluster]:
    """Simulated Neuron nodes and, cordoned until a test asks for it, one real kubelet node running our images."""
    with SimulatedCluster(real_node_images=built_images) as simcluster:
        yield simcluster


@pytest.fixture(scope="module")
def real_node(cluster: SimulatedCluster) -> Iterator[str]:
    """The module's pods schedule onto the real node only (its name is the value)."""
    with cluster.place_on_real_node() as name:
        yield name


@pytest.fixture
def namespace(cluster: SimulatedCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = cluster.create_namespace(f"t-{readable}-{digest}")
    yield name
    client.CoreV1Api(cluster.api).delete_namespace(name)


def wait_for(condition: Callable[[], Any], timeout: float = 90, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
