"""The NeuronModel CRD this operator was built with, and the check that the cluster serves that one.

Helm installs a chart's ``crds/`` but never upgrades them: after a ``helm upgrade`` the old schema would stay,
pruning new fields and validating against old rules without a word. The CRD carries a digest of its spec; the
operator knows the digest of the CRD it ships with, and does not start against another one.
"""

from __future__ import annotations

from kubernetes import client

from .naming import GROUP
from .reconcile import REQUEST_TIMEOUT

CRD_NAME = f"neuronmodels.{GROUP}"
DIGEST_ANNOTATION = f"{GROUP}/schema-digest"
SCHEMA_DIGEST = "4450e8585038"  # of crds/neuronmodel.yaml's spec; a unit test keeps the two equal


def stale_crd_message(api_client: client.ApiClient | None = None) -> str | None:
    """None when the cluster's NeuronModel CRD is the one this operator ships with, else what to do about it. With
    the reconcile's timeouts: a hung connection at start would leave the operator not ready, saying nothing."""
    api = client.ApiextensionsV1Api(api_client)
    crd = api.read_custom_resource_definition(CRD_NAME, _request_timeout=REQUEST_TIMEOUT)
    installed = (crd.metadata.annotations or {}).get(DIGEST_ANNOTATION)
    if installed == SCHEMA_DIGEST:
        return None
    return (
        f"the NeuronModel CRD in the cluster has schema digest {installed or '(none)'}, this operator needs "
        f"{SCHEMA_DIGEST}: Helm does not upgrade CRDs, so apply the chart's before the upgrade (kubectl apply "
        "--server-side --force-conflicts -f charts/neuronmodel-operator/crds/); waiting for it"
    )
