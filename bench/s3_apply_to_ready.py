"""Apply-to-Ready of an S3-sourced NeuronModel on the local control plane, against a plain download of the same
objects (issue 13's floor), measured in the same run.

bench/s3_source.py measures the rewrite alone. What a user waits for is longer: from `kubectl apply` until the
model's status says Ready, the operator creates the rewrite Job, the Job's pod is scheduled and run, the rewrite
reads the S3 objects in place into the store, the operator creates the serving Deployment, its pod is scheduled
and started, and the operator writes Ready. This script measures that whole wait and where it goes.

Per model size (built as bench/s3_source.py builds it: half a NEFF-sized `executable` in saved_model.pb, half
variables, uploaded to the local S3 of `localcluster.s3server`):

  floor          boto3's transfer manager downloading every object to the same disk: bench/s3_source.py's floor,
                 three fresh processes, the median
  apply-to-Ready the create call of a NeuronModel whose `spec.source.s3` (uri, region, endpointUrl) is that prefix,
                 until its status has phase Ready, read from a watch; three NeuronModels, one after the other,
                 each deleted (and its store directory cleaned by the operator) before the next is created

Each NeuronModel has a fresh name, so its default store path (`<namespace>/<name>`), and with it its rewrite id, is
new: no rewrite is reused (the status's `rewrite.reused` is checked). Where the time goes comes from watches on the
Jobs, Deployments and NeuronModels (when each was first seen, Complete, Ready) and from the rewrite's own
`status.rewrite.durationSeconds` (its report's `seconds`: from the start of its work to the last model file written
and synced; not the interpreter's start-up, the marker, the directory syncs or the publishing rename). "The rest" is
the Job's time minus that, per model.

The control plane (etcd, apiserver, controller-manager, scheduler) runs with one simulated trn1.32xlarge node whose
node agent runs in this process: the rewrite Job's pod runs `tf-neuron-auto-multicore` as a local process, with
IRSA's environment pointed at the local STS; the serving pod is checked (model tagged for its cores) and reported
Ready, as in the operator's tests. The operator runs as tests/operator/conftest.py's Env.start_operator runs it.
Needs root (the node agent), and one control plane per machine: nothing else that runs one may run meanwhile.

Usage: .venv/bin/python bench/s3_apply_to_ready.py [--sizes 256,1024] [--timeout 600] [--out FILE]
Results: bench/results/s3_apply_to_ready-<time>.json (operator and S3 logs beside it), a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from operator_scale import (  # noqa: E402
    NAMESPACE,
    RESULTS,
    WATCHED,
    ReadyWatch,
    job_complete,
    load_helpers,
    model_of,
    model_ready,
    read_audit,
)
from rewrite_bench import build_neuron_model  # noqa: E402
from s3_source import BUCKET, REGION, contenders, measure_contender, upload, use_endpoint  # noqa: E402

RUNS = 3
CORES = 4  # as bench/s3_source.py's rewrite
NODES = {"trn1.32xlarge": 1}
SERVICE_ACCOUNT = "model-reader"
ROLE_ARN = "arn:aws:iam::111122223333:role/neuron-model-reader"  # as examples/s3-irsa.yaml
FAILED_PHASES = frozenset({"Failed", "Degraded"})
# The steps between the create call and Ready, each as (from, to) of the timeline a repetition records.
STEPS = {
    "apply_to_job": ("apply", "job_created"),
    "job_run": ("job_created", "job_complete"),
    "job_to_deployment": ("job_complete", "deployment_created"),
    "deployment_to_ready": ("deployment_created", "ready"),
    "apply_to_ready": ("apply", "ready"),
}


class Clients:
    """What operator_scale.ReadyWatch asks of its host: a new API client (its own connection pool) per watch."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(str(self.kubeconfig))


def is_rewrite_job(job: dict[str, Any]) -> bool:
    """The rewrite Job, not a store clean-up Job (`<model>-clean-...`)."""
    return "-rewrite-" in job["metadata"]["name"]


class Watches:
    """When each object was first seen in the state that marks a step: all from watches, so no poll interval is in
    the timings."""

    def __init__(self, clients: Clients, helpers: Any) -> None:
        self.last: dict[str, dict[str, Any]] = {}  # each NeuronModel as last seen, to stop early on a failure
        self.jobs = ReadyWatch(clients, ("batch", "v1", "jobs"), is_rewrite_job)
        self.done = ReadyWatch(clients, ("batch", "v1", "jobs"), lambda job: is_rewrite_job(job) and job_complete(job))
        self.deployments = ReadyWatch(clients, ("apps", "v1", "deployments"), lambda _: True)
        self.models = ReadyWatch(
            clients,
            (helpers.GROUP, helpers.VERSION, helpers.PLURAL),
            model_ready,
            on_event=lambda obj: self.last.__setitem__(obj["metadata"]["name"], obj),
        )

    def all(self) -> list[ReadyWatch]:
        return [self.jobs, self.done, self.deployments, self.models]

    def stop(self) -> None:
        for watch in self.all():
            watch.stopping.set()

    def job_of(self, model: str) -> str | None:
        return next((j for j in self.jobs.ready if model_of(j) == model), None)


def wait_watching(env: Any, audit_log: Path, timeout: float = 120) -> None:
    """Until the operator has listed every kind it watches, so the first model's time holds no operator start-up.
    (What operator_scale's Phase.wait_watching checks, for an Env outside a Phase.)"""
    since, deadline = time.time() - 5, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if env.operator.poll() is not None:
            raise RuntimeError(f"the operator exited with {env.operator.returncode}: see {env.log}")
        if {r.resource for r in read_audit(audit_log, since) if r.actor == "kopf" and r.verb == "list"} >= WATCHED:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the operator never listed all of {sorted(WATCHED)}: see {env.log}")


def manifest(helpers: Any, name: str, uri: str, endpoint: str) -> dict[str, Any]:
    """A NeuronModel reading ``uri`` in place with the service account's (IRSA) identity."""
    body = helpers.neuron_model(name, "unused", cores=CORES, replicas=1, serviceAccountName=SERVICE_ACCOUNT)
    body["metadata"]["namespace"] = NAMESPACE
    body["spec"]["source"] = {"s3": {"uri": uri, "region": REGION, "endpointUrl": endpoint}}
    return body


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def apply_to_ready(env: Any, helpers: Any, watches: Watches, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Create one NeuronModel and wait (deadline ``timeout``) for Ready; its timeline, in seconds from the create."""
    name = body["metadata"]["name"]
    t0 = time.time()
    env.custom.create_namespaced_custom_object(helpers.GROUP, helpers.VERSION, NAMESPACE, helpers.PLURAL, body)
    deadline = time.monotonic() + timeout
    while name not in watches.models.ready:
        status = (watches.last.get(name) or {}).get("status") or {}
        dead = [w.name for w in watches.all() if not w.is_alive()]
        problem = (
            f"phase {status['phase']}" if status.get("phase") in FAILED_PHASES
            else f"watch {dead} died" if dead
            else f"the operator exited with {env.operator.returncode}" if env.operator.poll() is not None
            else f"not Ready after {timeout} s" if time.monotonic() > deadline
            else None
        )  # fmt: skip
        if problem is not None:
            raise RuntimeError(f"{name}: {problem}; status: {json.dumps(status)}\noperator log:\n{log_tail(env.log)}")
        time.sleep(0.1)
    status = env.status(name)
    rewrite = status.get("rewrite") or {}
    if rewrite.get("reused"):
        raise RuntimeError(f"{name}: the rewrite was reused, not run: {rewrite}")
    job = watches.job_of(name)
    from neuronmodel_operator.naming import serving_name

    seen = {
        "apply": t0,
        "job_created": watches.jobs.ready.get(job or ""),
        "job_complete": watches.done.ready.get(job or ""),
        "deployment_created": watches.deployments.ready.get(serving_name(name)),
        "ready": watches.models.ready[name],
    }
    steps = {
        step: round(seen[end] - seen[start], 3) if seen[start] and seen[end] else None
        for step, (start, end) in STEPS.items()
    }
    duration = rewrite.get("durationSeconds")
    # What the Job took besides the rewrite's own work: pod scheduling and start, the interpreter and its imports,
    # the publishing rename, the pod's exit seen by the Job controller.
    job_rest = round(steps["job_run"] - duration, 3) if steps["job_run"] is not None and duration is not None else None
    return {
        "name": name,
        "job": job,
        **steps,
        "rewrite_duration_seconds": duration,
        "job_rest": job_rest,
        "rewrite_bytes_written": rewrite.get("bytesWritten"),
        "rewrite_id": rewrite.get("id"),
    }


def delete_and_settle(env: Any, helpers: Any, name: str, timeout: float) -> None:
    """Delete the model and wait until its children and its store clean-up Job are gone: the next repetition then
    shares the machine with nothing of this one, and its rewrite finds an empty store."""
    env.custom.delete_namespaced_custom_object(helpers.GROUP, helpers.VERSION, NAMESPACE, helpers.PLURAL, name)

    def settled() -> bool:
        models = env.custom.list_namespaced_custom_object(helpers.GROUP, helpers.VERSION, NAMESPACE, helpers.PLURAL)
        pods = env.core.list_namespaced_pod(NAMESPACE).items
        return not models["items"] and not env.jobs() and not pods

    helpers.wait_for(settled, timeout, what=f"{name}, its children and its store clean-up gone")


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def measure_size(
    size: int, endpoint: str, tmp: Path, env: Any, helpers: Any, watches: Watches, timeout: float
) -> dict[str, Any]:
    """One size: upload, the floor (three downloads), then three NeuronModels from the same prefix."""
    model = build_neuron_model(tmp / f"model-{size}", size)
    prefix = f"model-{size}/"
    upload(endpoint, model, prefix)
    shutil.rmtree(model)
    floor = measure_contender(contenders("s3", prefix, tmp / "floor")["floor"], tmp / "floor")
    print(f"{size} MiB: floor {floor['seconds']:.2f} s", file=sys.stderr, flush=True)
    reps = []
    for rep in range(1, RUNS + 1):
        body = manifest(helpers, f"s3-{size}-{rep}", f"s3://{BUCKET}/{prefix}", endpoint)
        reps.append(apply_to_ready(env, helpers, watches, body, timeout))
        delete_and_settle(env, helpers, body["metadata"]["name"], timeout)
        print(f"{size} MiB: {json.dumps(reps[-1])}", file=sys.stderr, flush=True)
    keys = [*STEPS, "rewrite_duration_seconds", "job_rest"]
    medians = {key: median([r[key] for r in reps]) for key in keys}
    ready = medians["apply_to_ready"]
    medians["ratio_to_floor"] = round(ready / floor["seconds"], 2) if ready is not None else None
    return {"size_mib": size, "floor": floor, "reps": reps, "median": medians}


def run(sizes: list[int], tmp: Path, logs: Path, timeout: float) -> list[dict[str, Any]]:
    """Start the local S3, the control plane and the operator once; measure every size on them."""
    from kubernetes import client

    from localcluster import awsidentity, s3server
    from localcluster.agent import IRSA_ROLE_ANNOTATION
    from localcluster.simcluster import SimulatedCluster

    helpers = load_helpers()
    rows: list[dict[str, Any]] = []
    with (
        SimulatedCluster(nodes=dict(NODES)) as sim,
        s3server.running(logs / "s3.log", identity=awsidentity.Options(kubeconfig=sim.kubeconfig)) as endpoint,
    ):
        awsidentity.trust(endpoint, ROLE_ARN, f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")
        use_endpoint(endpoint)  # for the upload and the floor; the Job gets the endpoint from the spec
        assert sim.agent is not None and sim.cluster.workdir is not None
        sim.agent.aws_env["AWS_ENDPOINT_URL_STS"] = endpoint  # IRSA's web identity, exchanged at the local STS
        kubectl = sim.cluster.kubectl
        kubectl("apply", "-f", str(helpers.CRD))
        helpers.wait_for(lambda: kubectl("get", "nm", "-A", check=False).returncode == 0, what="CRD established")
        sim.create_namespace(NAMESPACE)
        env = helpers.Env(sim, NAMESPACE, logs)
        env.hostpath_claim("model-store", helpers.make_store(tmp / "store"))
        client.CoreV1Api(sim.api).create_namespaced_service_account(
            NAMESPACE, {"metadata": {"name": SERVICE_ACCOUNT, "annotations": {IRSA_ROLE_ANNOTATION: ROLE_ARN}}}
        )
        watches = Watches(Clients(sim.kubeconfig), helpers)
        try:
            env.start_operator()
            wait_watching(env, sim.cluster.workdir / "audit.log")
            for size in sizes:
                rows.append(measure_size(size, endpoint, tmp, env, helpers, watches, timeout))
        finally:
            watches.stop()
            env.stop_operator()
    return rows


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per model size: the floor, apply-to-Ready and its ratio, and the steps in between (medians of three,
    each column on its own, so the steps need not add up to the total exactly)."""
    lines = [
        "| model | floor | apply to Ready | / floor | apply to Job | Job created to Complete | of which rewrite "
        "(status) | of which the rest | Job Complete to Deployment | Deployment to Ready |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["median"]
        lines.append(
            f"| {row['size_mib']} MiB | {row['floor']['seconds']:.2f} s | {seconds(m['apply_to_ready'])} "
            f"| {m['ratio_to_floor']:.2f}x | {seconds(m['apply_to_job'])} | {seconds(m['job_run'])} "
            f"| {seconds(m['rewrite_duration_seconds'])} | {seconds(m['job_rest'])} "
            f"| {seconds(m['job_to_deployment'])} | {seconds(m['deployment_to_ready'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="model sizes in MiB")
    parser.add_argument("--timeout", type=float, default=600, help="longest wait for one model's Ready, seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    args = parser.parse_args(argv)
    # Stopped by a signal, still stop what we started (operator, control plane, local S3): finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(s) for s in args.sizes.split(",")]
    out = args.out or RESULTS / f"s3_apply_to_ready-{time.strftime('%Y%m%d-%H%M%S')}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="s3-apply-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        rows = run(sizes, Path(tmp), logs, args.timeout)
    meta = {"cores": CORES, "nodes": NODES, "runs": RUNS, "took_seconds": round(time.monotonic() - started)}
    out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, **meta, "rows": rows}, indent=1))
    print(table(rows))
    print(f"\nresults: {out} (run took {meta['took_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
