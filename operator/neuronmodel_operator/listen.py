"""Where the operator's health and metrics endpoints listen, so that probes and scrapes reach them on IPv4, IPv6-only
(EKS's IPv6 clusters) and dual-stack pods alike."""

from __future__ import annotations

import ipaddress
import socket

IPV4_ANY, IPV6_ANY = "0.0.0.0", "::"


def dual_stack_host() -> str:
    """``::`` where the host can open an IPv6 socket that takes IPv4 too (IPV6_V6ONLY off: IPv4 peers arrive as
    ``::ffff:a.b.c.d``), else ``0.0.0.0`` (a kernel without IPv6, or one that forbids mixing the two)."""
    if not socket.has_ipv6:
        return IPV4_ANY
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((IPV6_ANY, 0))
    except OSError:
        return IPV4_ANY
    return IPV6_ANY


def liveness_endpoint(url: str, pod_ip: str | None) -> str:
    """Kopf's liveness URL, with a missing host (``http://:8080/healthz``) filled in.

    Kopf listens through asyncio, which makes every IPv6 socket IPv6-only, so its endpoint gets one family: that
    of the pod's primary IP (``status.podIP``), which is the one the kubelet probes and a single-stack Service
    routes to. Without a pod IP (run by hand), IPv4.
    """
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    if not scheme or not rest.startswith(":"):
        return url
    try:
        ipv6 = ipaddress.ip_address(pod_ip or IPV4_ANY).version == 6
    except ValueError:
        ipv6 = False
    return f"{scheme}://{'[::]' if ipv6 else IPV4_ANY}{rest}"
