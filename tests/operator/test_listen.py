"""The health and metrics endpoints listen where probes and scrapes come from: IPv6-only EKS clusters too."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import pytest

from localcluster.cluster import free_port
from neuronmodel_operator import listen, metrics


def loopback_exists(family: socket.AddressFamily, address: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def test_dual_stack_where_the_host_has_ipv6_else_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = listen.IPV6_ANY if loopback_exists(socket.AF_INET6, "::1") else listen.IPV4_ANY
    assert listen.dual_stack_host() == expected
    monkeypatch.setattr(socket, "has_ipv6", False)
    assert listen.dual_stack_host() == listen.IPV4_ANY


def test_ipv4_where_the_kernel_refuses_ipv6_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    assert listen.dual_stack_host() == listen.IPV4_ANY


@pytest.mark.parametrize(
    ("pod_ip", "endpoint"),
    [
        ("fd00:ec2::5", "http://[::]:8080/healthz"),  # an IPv6 EKS cluster's pod
        ("10.0.3.7", "http://0.0.0.0:8080/healthz"),
        (None, "http://0.0.0.0:8080/healthz"),  # run by hand
        ("not-an-ip", "http://0.0.0.0:8080/healthz"),
    ],
)
def test_kopfs_endpoint_takes_the_family_of_the_pod_ip(pod_ip: str | None, endpoint: str) -> None:
    assert listen.liveness_endpoint("http://:8080/healthz", pod_ip) == endpoint


def test_a_liveness_host_given_is_kept() -> None:
    assert listen.liveness_endpoint("http://127.0.0.1:8080/healthz", "fd00::5") == "http://127.0.0.1:8080/healthz"


@pytest.fixture(scope="module")
def metrics_port() -> Any:
    port = free_port()
    server = metrics.serve(port)
    yield port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("family", "loopback", "url"),
    [(socket.AF_INET, "127.0.0.1", "http://127.0.0.1:{}/metrics"), (socket.AF_INET6, "::1", "http://[::1]:{}/metrics")],
    ids=["ipv4", "ipv6"],
)
def test_the_metrics_answer_on_each_loopback_the_machine_has(
    metrics_port: int, family: socket.AddressFamily, loopback: str, url: str
) -> None:
    """Each loopback the machine has answers; without ::1 what is left to check is the fallback to IPv4."""
    if not loopback_exists(family, loopback):
        assert family == socket.AF_INET6 and listen.dual_stack_host() == listen.IPV4_ANY
        return
    with urllib.request.urlopen(url.format(metrics_port), timeout=5) as response:
        assert b"neuronmodel_models" in response.read()
