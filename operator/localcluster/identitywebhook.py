"""EKS's pod identity webhook (github.com/aws/amazon-eks-pod-identity-webhook, built by build-kubernetes.sh) beside
the local apiserver, as EKS runs it beside its own: every pod created in the cluster, for simulated and real nodes
alike, gets what EKS would give it, from the webhook itself rather than from an imitation.

- IRSA: a pod whose ServiceAccount is annotated ``eks.amazonaws.com/role-arn`` gets AWS_ROLE_ARN and
  AWS_WEB_IDENTITY_TOKEN_FILE (IRSA_TOKEN_FILE) in each container that sets neither, and a projected
  serviceAccountToken volume (audience sts.amazonaws.com, or the ``eks.amazonaws.com/audience`` annotation's).
- EKS Pod Identity: a pod whose namespace and ServiceAccount are listed in the file the webhook watches
  (``associate``, as EKS's pod identity associations) gets AWS_CONTAINER_CREDENTIALS_FULL_URI and
  AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE instead (in each container that sets neither; this wins over a role
  annotation), the label eks.amazonaws.com/pod-identity=enabled and its projected token (audience
  pods.eks.amazonaws.com).
- Both: the cluster's region (AWS_REGION) as AWS_REGION and AWS_DEFAULT_REGION unless a container sets either, and
  AWS_STS_REGIONAL_ENDPOINTS=regional, EKS's default since 1.22.

The webhook runs as a local process on a free port with a certificate of its own CA, reads ServiceAccounts with an
identity of its own (get, list and watch ServiceAccounts: the deploy manifests' ClusterRole without its certificate
signing requests, which only ``--in-cluster=true`` makes), and is registered as the repository's deploy manifest
registers it (deploy/mutatingwebhook.yaml), under the names EKS uses, with a URL as on EKS's control plane.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client, config

from .cluster import ClusterError, LocalCluster, ManagedProcess, free_port, spawn, terminate_groups

log = logging.getLogger("localcluster.identitywebhook")

BINARY = "amazon-eks-pod-identity-webhook"
AWS_REGION = "us-west-2"  # the cluster's region, which the webhook injects (--aws-default-region)
NAMESPACE = "pod-identity-webhook"  # the webhook's identity and its readiness probes' service accounts
CONFIGURATION, WEBHOOK = "pod-identity-webhook", "iam-for-pods.amazonaws.com"  # EKS's names (in the audit log)
ROLE_ARN_ANNOTATION = "eks.amazonaws.com/role-arn"
SKIP_LABEL = "eks.amazonaws.com/skip-pod-identity-webhook"  # pods labelled so are never sent to the webhook
STS_AUDIENCE = "sts.amazonaws.com"
IRSA_TOKEN_FILE = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
POD_IDENTITY_AUDIENCE = "pods.eks.amazonaws.com"
POD_IDENTITY_FULL_URI = "http://169.254.170.23/v1/credentials"  # the EKS Pod Identity Agent on every node
POD_IDENTITY_MOUNT = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"
POD_IDENTITY_TOKEN_FILE = f"{POD_IDENTITY_MOUNT}/eks-pod-identity-token"
# The webhook's log line once it has read the associations file (pkg/containercredentials/config.go Load).
LOADED = "Successfully loaded container credentials config file"
# A pod admitted before the webhook's ServiceAccount informer saw its new account would go unmutated (tests create
# both back to back); for an account missing from its cache the webhook then asks the apiserver, waiting this long.
LOOKUP_GRACE = "5s"
IDENTITY_SECONDS = 7 * 24 * 3600  # the webhook's own token: longer than any session (the apiserver sets no maximum)
CERTIFICATE_DAYS = 7  # as the cluster's own certificates
PROBE_ROLE = "arn:aws:iam::111122223333:role/pod-identity-webhook-probe"
IRSA_PROBE, POD_IDENTITY_PROBE = "irsa-probe", "pod-identity-probe"


def _objects() -> list[dict[str, Any]]:
    """The webhook's namespace, identity (deploy/auth.yaml's ServiceAccount and ClusterRole, less what only the
    in-cluster certificate mode needs) and the readiness probes' two service accounts."""

    def account(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        metadata = {"name": name, "namespace": NAMESPACE, "annotations": annotations or {}}
        return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}

    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        account(BINARY),
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": BINARY},
         "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": BINARY},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": BINARY},
         "subjects": [{"kind": "ServiceAccount", "name": BINARY, "namespace": NAMESPACE}]},
        account(IRSA_PROBE, {ROLE_ARN_ANNOTATION: PROBE_ROLE}),
        account(POD_IDENTITY_PROBE),
    ]  # fmt: skip


def _registration(port: int, ca: bytes) -> dict[str, Any]:
    """deploy/mutatingwebhook.yaml with a URL instead of a Service: pods on CREATE, failurePolicy Ignore (a pod is
    admitted unmutated when the webhook does not answer, as on EKS), AdmissionReview v1beta1 (the handler's; its
    answer carries no apiVersion, which only v1 reviews require), and the v1 defaults that manifest gets written out:
    matchPolicy Equivalent, reinvocationPolicy Never (EKS clusters were seen with Never and with IfNeeded, #187;
    nothing here adds containers after it), timeoutSeconds 10."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION},
        "webhooks": [
            {
                "name": WEBHOOK,
                "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate", "caBundle": base64.b64encode(ca).decode()},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "objectSelector": {"matchExpressions": [{"key": SKIP_LABEL, "operator": "DoesNotExist"}]},
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "Never",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1beta1"],
                "timeoutSeconds": 10,
            }
        ],
    }


def _serving_certificate(directory: Path) -> bytes:
    """A CA of its own and a certificate for 127.0.0.1 it signs (tls.crt, tls.key), since the apiserver checks the
    webhook's certificate against the registration's caBundle for the URL's address. Returns the CA's PEM."""
    now = datetime.now(timezone.utc)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CERTIFICATE_DAYS))
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localcluster-pod-identity-webhook-ca")])
    ca = (
        certificate("localcluster-pod-identity-webhook-ca", ca_key, ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    serving = (
        certificate("127.0.0.1", key, ca_name)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_file = directory / "tls.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "tls.crt").write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.crt").write_bytes(ca_pem)
    return ca_pem


def _probe_pod(account: str) -> dict[str, Any]:
    return {
        "metadata": {"name": account},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "probe", "image": "probe"}],
        },
    }


@dataclass
class IdentityWebhook:
    """The webhook for ``cluster`` (started): ``start()``, ``associate()``, ``stop()``."""

    cluster: LocalCluster
    region: str = AWS_REGION
    port: int = field(init=False, default=0)  # a free one, chosen at start
    process: ManagedProcess | None = field(init=False, default=None)
    _associations: set[tuple[str, str]] = field(init=False, default_factory=set)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    @property
    def dir(self) -> Path:
        assert self.cluster.workdir is not None
        return self.cluster.workdir / "pod-identity-webhook"

    @property
    def associations_file(self) -> Path:
        """What the webhook watches (--watch-container-credentials-config): {"identities": [{namespace,
        serviceAccount}]}: the cluster's pod identity associations, as EKS hands them to its webhook."""
        return self.dir / "pod-identity-associations.json"

    @property
    def associations(self) -> frozenset[tuple[str, str]]:
        """The (namespace, service account) pairs associated so far (the readiness probe's own not counted)."""
        return frozenset(self._associations)

    def start(self, timeout: float = 60) -> None:
        started = time.monotonic()
        deadline = started + timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        ca = _serving_certificate(self.dir)
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_objects()))
        self._write_kubeconfig()
        self._write_associations()
        self.port = free_port()
        argv = [
            str(self.cluster.bin_dir / BINARY),
            "--in-cluster=false",
            f"--kubeconfig={self.dir / 'kubeconfig'}",
            f"--tls-cert={self.dir / 'tls.crt'}",
            f"--tls-key={self.dir / 'tls.key'}",
            f"--port={self.port}",  # it listens on every address (":port"): there is no option for one
            f"--metrics-port={free_port()}",
            "--annotation-prefix=eks.amazonaws.com",
            f"--token-audience={STS_AUDIENCE}",
            f"--aws-default-region={self.region}",
            "--sts-regional-endpoint=true",
            f"--service-account-lookup-grace-period={LOOKUP_GRACE}",
            f"--watch-container-credentials-config={self.associations_file}",
            f"--container-credentials-audience={POD_IDENTITY_AUDIENCE}",
            f"--container-credentials-full-uri={POD_IDENTITY_FULL_URI}",
            f"--container-credentials-token-mount-path={POD_IDENTITY_MOUNT}",
            "--v=3",  # one line per pod it mutates
        ]
        atexit.register(self.stop)
        self.process = spawn("pod-identity-webhook", argv, self.dir.parent)
        try:
            self._wait_healthy(deadline)
            self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(_registration(self.port, ca)))
            self._wait_mutating(deadline)
        except BaseException:
            self.stop()
            raise
        log.info(
            "pod identity webhook ready port=%d pid=%d region=%s seconds=%.1f",
            self.port,
            self.process.popen.pid,
            self.region,
            time.monotonic() - started,
        )

    def associate(self, namespace: str, service_account: str, timeout: float = 30) -> None:
        """As EKS's CreatePodIdentityAssociation, for the webhook: pods of ``namespace``'s ``service_account``
        created from now on get Pod Identity's variables and token. Returns once the webhook has read it."""
        self._update((namespace, service_account), True, timeout)

    def disassociate(self, namespace: str, service_account: str, timeout: float = 30) -> None:
        """As EKS's DeletePodIdentityAssociation: new pods of that service account get no Pod Identity."""
        self._update((namespace, service_account), False, timeout)

    def stop(self) -> None:
        """Unregister it (pods are then admitted without asking it) and stop the process."""
        if self.process is None:
            return
        self.cluster.kubectl(
            "delete", "mutatingwebhookconfiguration", CONFIGURATION, "--ignore-not-found", "--request-timeout=5s",
            check=False,
        )  # fmt: skip
        terminate_groups([self.process.popen])
        self.process = None
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 30) -> str:
        return self.cluster.log_tail("pod-identity-webhook", lines)

    # Start-up ---------------------------------------------------------------------------------------------------

    def _write_kubeconfig(self) -> None:
        """The cluster's kubeconfig with the webhook's own service account token in place of the admin's."""
        token = self.cluster.kubectl(
            "create", "token", BINARY, "-n", NAMESPACE, f"--duration={IDENTITY_SECONDS}s"
        ).stdout.strip()
        kubeconfig = yaml.safe_load(self.cluster.kubeconfig.read_text())
        kubeconfig["users"] = [{"name": BINARY, "user": {"token": token}}]
        kubeconfig["contexts"][0]["context"]["user"] = BINARY
        path = self.dir / "kubeconfig"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(kubeconfig))

    def _write_associations(self) -> None:
        """Replace the file in one rename: the webhook reloads it on the event for its name, and must never read a
        half-written file (an empty one clears every association)."""
        pairs = sorted(self._associations | {(NAMESPACE, POD_IDENTITY_PROBE)})
        document = {"identities": [{"namespace": ns, "serviceAccount": account} for ns, account in pairs]}
        staged = self.associations_file.with_name(f".{self.associations_file.name}.tmp")
        staged.write_text(json.dumps(document))
        staged.replace(self.associations_file)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.popen.poll() is not None:
            code = self.process.popen.returncode
            raise ClusterError(f"the pod identity webhook exited with {code}:\n{self.log_tail()}")

    def _wait_healthy(self, deadline: float) -> None:
        """Until /healthz answers over TLS verified with its CA, for 127.0.0.1: what the apiserver will check."""
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        while True:
            self._check_alive()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"https://127.0.0.1:{self.port}/healthz", context=context, timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"the pod identity webhook did not answer /healthz:\n{self.log_tail()}")
            time.sleep(0.2)

    def _wait_mutating(self, deadline: float) -> None:
        """Until the apiserver sends it pods and it mutates them: dry-run creations (admitted, never stored) of a pod
        of the IRSA probe account and one of the Pod Identity probe account show the variables injected."""
        core = client.CoreV1Api(config.new_client_from_config(str(self.cluster.kubeconfig)))

        def injected(account: str) -> dict[str, str]:
            pod = core.create_namespaced_pod(NAMESPACE, _probe_pod(account), dry_run="All")
            return {e.name: e.value for e in pod.spec.containers[0].env or []}

        while True:
            self._check_alive()
            irsa, pod_identity = injected(IRSA_PROBE), injected(POD_IDENTITY_PROBE)
            if (
                irsa.get("AWS_ROLE_ARN") == PROBE_ROLE
                and pod_identity.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") == POD_IDENTITY_FULL_URI
            ):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"pods are not mutated by the pod identity webhook:\n{self.log_tail()}")
            time.sleep(0.2)

    # Associations -----------------------------------------------------------------------------------------------

    def _loads(self) -> int:
        assert self.process is not None
        return self.process.log.read_text(errors="replace").count(LOADED)

    def _update(self, pair: tuple[str, str], associated: bool, timeout: float) -> None:
        """Write the file and wait for the webhook's own word that it loaded it: one more LOADED line. Serialised,
        so the line counted is the load of this write (a rename is one event for the watched name)."""
        with self._lock:
            self._check_alive()
            before = self._loads()
            if associated:
                self._associations.add(pair)
            else:
                self._associations.discard(pair)
            self._write_associations()
            deadline = time.monotonic() + timeout
            while self._loads() <= before:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ClusterError(f"the pod identity webhook did not reload its associations:\n{self.log_tail()}")
                time.sleep(0.05)
        log.info("pod identity association namespace=%s service_account=%s associated=%s", *pair, associated)
