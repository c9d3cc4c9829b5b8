"""What a real kubelet, kube-proxy and containerd change on the host, recorded before they start and put back after.

The kubelet tunes kernel settings at start-up, kube-proxy and the kubelet add ``KUBE-*`` iptables chains, and all
three create directories at fixed paths. The test machine is shared with everything else the developer runs, so
``HostSnapshot.restore()`` undoes each of those changes; it is safe to call more than once.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("localcluster.host")

# Set by the kubelet (kernel.*, vm.*: its "protect kernel defaults" tuning) and by the node's networking.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)
# Fixed paths the kubelet (device-plugin socket, pod logs) and the CNI plugins (result cache) write to.
FIXED_DIRECTORIES = (Path("/var/lib/kubelet"), Path("/var/log/pods"), Path("/var/log/containers"), Path("/var/lib/cni"))
IPTABLES = ("iptables", "ip6tables")


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys", *key.split("."))


@dataclass
class HostSnapshot:
    """The host as it was before the node started."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)
    absent_directories: list[Path] = field(default_factory=list)

    @classmethod
    def take(cls) -> HostSnapshot:
        snapshot = cls()
        for key in SYSCTLS:
            with contextlib.suppress(OSError):
                snapshot.sysctls[key] = _sysctl_path(key).read_text().strip()
        for tool in IPTABLES:
            if shutil.which(f"{tool}-save"):
                snapshot.iptables[tool] = subprocess.run(
                    [f"{tool}-save"], capture_output=True, text=True, check=True
                ).stdout
        snapshot.absent_directories = [d for d in FIXED_DIRECTORIES if not d.exists()]
        return snapshot

    def differences(self, later: HostSnapshot) -> list[str]:
        """What differs in ``later`` (taken after a node stopped): empty when everything was put back."""
        found = [f"{k}: {v} -> {later.sysctls.get(k)}" for k, v in self.sysctls.items() if later.sysctls.get(k) != v]
        for tool, rules in self.iptables.items():
            before, after = _rules(rules), _rules(later.iptables.get(tool, ""))
            found += [f"{tool}: {rule} gone" for rule in sorted(before - after)]
            found += [f"{tool}: {rule} left" for rule in sorted(after - before)]
        found += [f"{d} left" for d in self.absent_directories if d not in later.absent_directories]
        return found

    def restore(self) -> None:
        for key, value in self.sysctls.items():
            path = _sysctl_path(key)
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
                    log.info("restored %s=%s", key, value)
            except OSError as exc:
                log.warning("could not restore %s=%s: %s", key, value, exc)
        for tool, rules in self.iptables.items():
            # Without --noflush each saved table is replaced whole: chains created since (KUBE-*) go with it.
            done = subprocess.run([f"{tool}-restore"], input=rules, capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("%s-restore failed: %s", tool, done.stderr.strip())
            _drop_tables_not_saved(tool, rules)
        for directory in self.absent_directories:
            shutil.rmtree(directory, ignore_errors=True)


def _drop_tables_not_saved(tool: str, saved: str) -> None:
    """Tables that were empty before (so absent from the save) but got rules since: flush and drop their chains."""
    had = {line[1:].strip() for line in saved.splitlines() if line.startswith("*")}
    now = subprocess.run([f"{tool}-save"], capture_output=True, text=True).stdout
    for table in {line[1:].strip() for line in now.splitlines() if line.startswith("*")} - had:
        subprocess.run([tool, "-t", table, "-F"], capture_output=True)
        subprocess.run([tool, "-t", table, "-X"], capture_output=True)


def _rules(saved: str) -> set[str]:
    """The rules, user chains and non-default policies of an ``iptables-save``, each with its table.

    An empty table is as good as none (restoring cannot unload one the kubelet made), so table headers and
    built-in chains that accept are left out, and so are comments and packet counters.
    """
    found, table = set(), ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain, policy = line[1:].split()[:2]
            if policy != "ACCEPT":
                found.add(f"{table} :{chain} {policy}")
        elif line.startswith("-"):
            found.add(f"{table} {line}")
    return found
