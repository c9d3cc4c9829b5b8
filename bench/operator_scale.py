"""The NeuronModel operator at scale (issue 6): N NeuronModels at once on the local control plane, against floors.

Each phase runs on a fresh control plane with the same simulated trn1.32xlarge nodes, so no phase inherits another's
objects, controller backlog or node-agent threads. The control plane and the node agent run in a child process of
this script, so the agent's CPU (and that of the rewrite processes it runs) is measured apart from this driver's.

  deployments  N bare serving Deployments, built by the operator's own builder and pointing at an already rewritten
               model: the floor the issue names (apiserver, controller-manager, scheduler, node agent). Not the fair
               floor for the operator: it skips the rewrite, which the operator cannot.
  pipeline     the fair floor: the operator's work done by a script with no overhead. N rewrite Jobs at once (the
               node agent runs each rewrite as a real local process), each Job's Deployment and Service created the
               moment the Job completes: 3 writes per model, the very objects the operator creates.
  kopf         bench/minimal_kopf_operator.py (watches NeuronModels and the operator's child kinds, does nothing)
               during the pipeline with a NeuronModel created beside each Job: Kopf's own memory, CPU and requests
               on the event streams the operator gets (all but its own status writes).
  operator     the NeuronModel operator (run as tests/operator/conftest.py's Env.start_operator runs it), N
               NeuronModels at once until all are Ready, then a settle period and an idle period.

Measured per phase: time until all are Ready; per-model latency from its create call to Ready (p50/p95/max); API
requests from the apiserver's audit log, told apart by user agent and split by verb; CPU seconds of every process
(operator, node agent and the rewrite processes it reaped, apiserver, etcd, controller-manager, scheduler); the
operator's peak RSS (VmHWM). Writes to reach Ready are the operator's writes from the first create until all models
are Ready, divided by N; idle requests are those the apiserver received in the idle window after the settle period.

Usage: .venv/bin/python bench/operator_scale.py [--sizes 50,200,500] [--phases deployments,pipeline,kopf,operator]
           [--idle 60] [--settle 10] [--timeout 3600] [--py-spy] [--out FILE]
Results: bench/results/operator_scale-<time>.json (logs beside it), and a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
INSTANCE, CORES_PER_NODE = "trn1.32xlarge", 32
NAMESPACE = "bench"
REWRITE_IMAGE = "local/rewrite:test"  # what Env.start_operator sets as NEURONMODEL_REWRITE_IMAGE
DRIVER_UA, AGENT_UA = "operator-scale-bench", "localcluster-agent"
OPERATOR_UA, KOPF_UA = "neuronmodel-operator", "kopf/"  # reconcile.USER_AGENT, and Kopf's aiohttp client
WRITES = frozenset({"create", "update", "patch", "delete", "deletecollection"})
WATCHED = frozenset({"neuronmodels", "jobs", "deployments", "services", "configmaps", "pods"})
CREATE_THREADS = 8
PHASES = ("deployments", "pipeline", "kopf", "operator")
TARGETS = {"vs_floor": 2.0, "writes_per_model": 8, "idle_writes": 0, "memory_mib_at_500": 200}


# The control plane and node agent, in a child process --------------------------------------------------------------


def serve_cluster(nodes: int) -> int:
    """Child process: start a SimulatedCluster, print where it is, stop it when the driver closes our stdin."""
    import logging

    from localcluster.simcluster import SimulatedCluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with SimulatedCluster(nodes={INSTANCE: nodes}) as sim:
        assert sim.agent is not None and sim.cluster.workdir is not None
        sim.agent.api_client.user_agent = AGENT_UA  # read per request: every later agent request carries it
        pids = {p.name: p.popen.pid for p in sim.cluster.processes}
        print(json.dumps({"workdir": str(sim.cluster.workdir), "pids": pids}), flush=True)
        sys.stdin.read()
    return 0


class Host:
    """The child process running the control plane and the node agent, and a handle on its cluster for the driver."""

    def __init__(self, nodes: int, log: Path) -> None:
        from localcluster.simcluster import SimulatedCluster

        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, __file__, "--serve-cluster", str(nodes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            self.popen.wait()
            raise RuntimeError(f"the cluster host exited with {self.popen.returncode}: see {log}")
        info = json.loads(line)
        self.workdir = Path(info["workdir"])
        self.pids: dict[str, int] = {**info["pids"], "agent": self.popen.pid}
        # Never started nor stopped here: a view on the host's cluster, so the test helpers (Env) work on it.
        self.view = SimulatedCluster(workdir=self.workdir)
        self.view.api = self.client()

    def client(self) -> Any:
        """A new API client (its own connection pool) that the audit log shows as this driver."""
        from kubernetes import config

        api = config.new_client_from_config(str(self.view.kubeconfig))
        api.user_agent = DRIVER_UA
        return api

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def close(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


# Process measurements (/proc) ---------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user+system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def memory_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def cpu_snapshot(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[name] = cpu_seconds(pid)
    return out


def cpu_delta(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots; ``<name>-children`` for the children a process reaped meanwhile."""
    out: dict[str, float] = {}
    for name, (own, children) in after.items():
        if name in before:
            out[name] = round(own - before[name][0], 2)
            if children > before[name][1]:
                out[f"{name}-children"] = round(children - before[name][1], 2)
    return out


# The audit log -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    at: float  # requestReceivedTimestamp, epoch seconds
    actor: str
    verb: str
    resource: str
    name: str


def actor_of(user_agent: str) -> str:
    """Who sent a request: the operator's two clients, the agent, this driver, or a control-plane component."""
    for prefix, actor in ((OPERATOR_UA, "operator"), (KOPF_UA, "kopf"), (AGENT_UA, "agent"), (DRIVER_UA, "bench")):
        if user_agent.startswith(prefix):
            return actor
    if user_agent.startswith("kube-controller-manager"):
        return "kcm:" + user_agent.rsplit("/", 1)[-1]  # ".../kubernetes/<commit>/deployment-controller"
    return user_agent.split("/", 1)[0] or "unknown"


def read_audit(path: Path, since: float) -> list[Request]:
    """One Request per audit ID received at or after ``since`` (a watch logs two stages: count it once)."""
    seen: set[str] = set()
    out = []
    with path.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event["auditID"] in seen:
                continue
            at = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            if at < since:
                continue
            seen.add(event["auditID"])
            ref = event.get("objectRef") or {}
            resource = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            out.append(Request(at, actor_of(event.get("userAgent", "")), event["verb"], resource, ref.get("name", "")))
    return out


def tally(requests: list[Request], actors: set[str], start: float, end: float) -> dict[str, Any]:
    """Requests of ``actors`` received in [start, end): total, writes, reads and counts of "verb resource"."""
    chosen = [r for r in requests if r.actor in actors and start <= r.at < end]
    writes = sum(r.verb in WRITES for r in chosen)
    return {
        "total": len(chosen),
        "writes": writes,
        "reads": len(chosen) - writes,
        "by_verb": dict(Counter(r.verb for r in chosen).most_common()),
        "by_verb_resource": dict(Counter(f"{r.verb} {r.resource}" for r in chosen).most_common()),
    }


def by_actor(requests: list[Request], start: float, end: float) -> dict[str, int]:
    return dict(Counter(r.actor for r in requests if start <= r.at < end).most_common())


def model_of(name: str) -> str:
    """The model a child's name belongs to: m-0001, m-0001-rewrite-<id>, m-0001-batching."""
    return name.split("-rewrite-")[0].removesuffix("-batching")


def writes_per_model(requests: list[Request], actors: set[str], ready: dict[str, float]) -> dict[str, Any]:
    """Named writes (children, status) of each model until its own Ready. Kopf creates Events under a generated
    name, which the audit log does not show: they are in the totals, not here."""
    counts: Counter[str] = Counter()
    for r in requests:
        if r.actor in actors and r.verb in WRITES and r.name and r.at <= ready.get(model_of(r.name), 0):
            counts[model_of(r.name)] += 1
    values = [counts.get(name, 0) for name in ready]
    return {"min": min(values), "p50": statistics.median(values), "max": max(values)} if values else {}


# Knowing when things are Ready -------------------------------------------------------------------------------------


class ReadyWatch(threading.Thread):
    """Records when each object of one resource first satisfies ``is_ready`` (list, then watch, again)."""

    def __init__(
        self,
        host: Host,
        resource: tuple[str, str, str],
        is_ready: Callable[[dict[str, Any]], bool],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"watch-{resource[-1]}")
        from kubernetes import client

        self.api = client.CustomObjectsApi(host.client())  # plain dicts, for the built-in groups as well
        self.args = (*resource[:2], NAMESPACE, resource[2])
        self.is_ready, self.on_event = is_ready, on_event
        self.ready: dict[str, float] = {}
        self.stopping = threading.Event()
        self.start()

    def _see(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name not in self.ready and self.is_ready(obj):
            self.ready[name] = time.time()
        if self.on_event is not None:
            self.on_event(obj)

    def run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        while not self.stopping.is_set():
            try:
                listing = self.api.list_namespaced_custom_object(*self.args)
                for obj in listing["items"]:
                    self._see(obj)
                version = listing["metadata"]["resourceVersion"]
                for event in watch.Watch().stream(
                    self.api.list_namespaced_custom_object, *self.args, resource_version=version, timeout_seconds=30
                ):
                    if self.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(event["object"])
            except ApiException as exc:
                if exc.status != 410:  # 410: the watch expired, list again
                    raise
            except Exception:
                if self.stopping.is_set():  # the control plane is going away
                    return
                raise

    def wait(self, names: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if names <= self.ready.keys():
                return True
            if not self.is_alive():
                raise RuntimeError(f"{self.name} died")
            time.sleep(0.2)
        return False


def deployment_available(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return (status.get("availableReplicas") or 0) >= (obj.get("spec") or {}).get("replicas", 1)


def model_ready(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") == "Ready"


def job_complete(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2), "max": round(ordered[-1], 2)}


# The phases --------------------------------------------------------------------------------------------------------


def load_helpers() -> Any:
    """tests/operator/conftest.py: Env (claims, the operator process), neuron_model, wait_for, CRD, GROUP..."""
    spec = importlib.util.spec_from_file_location("operator_conftest", REPO / "tests" / "operator" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    """What every phase of one benchmark run shares."""

    source: Path  # the compiled model every NeuronModel points at
    rewritten: Path  # the source rewritten for 1 core, copied into place for the bare-Deployment floor
    scratch: Path
    logs: Path
    helpers: Any
    settle: float
    idle: float
    timeout: float
    py_spy: bool
    keep_audit: bool = False


class Phase:
    """One phase of one size: set up before the clock starts, create one object per model, see each become Ready."""

    actors: frozenset[str] = frozenset()  # whose requests are the operator's (none: a floor)
    process = ""  # the name, in the results, of the Kopf process measured (none: a floor)

    def __init__(self, run: Run, size: int, host: Host, logs: Path) -> None:
        from kubernetes import client

        from neuronmodel_operator.builders import Model
        from neuronmodel_operator.config import OperatorConfig

        self.run, self.size, self.host, self.logs = run, size, host, logs
        helpers, kubectl = run.helpers, host.view.cluster.kubectl
        kubectl("apply", "-f", str(helpers.CRD))
        helpers.wait_for(lambda: kubectl("get", "nm", "-A", check=False).returncode == 0, what="CRD established")
        host.view.create_namespace(NAMESPACE)
        self.env = helpers.Env(host.view, NAMESPACE, logs)
        self.store = helpers.make_store(run.scratch / f"store-{logs.name}")
        self.env.hostpath_claim("model-store", self.store)
        self.env.hostpath_claim("model-source", run.source)
        self.config = OperatorConfig(rewrite_image=REWRITE_IMAGE)
        self.names = [f"m-{i:04d}" for i in range(size)]
        self.models = {name: Model.from_body(self.manifest(name)) for name in self.names}
        api = host.client()
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.batch, self.custom = client.BatchV1Api(api), client.CustomObjectsApi(api)
        self.jobs: ReadyWatch | None = None
        self.ready_watch: ReadyWatch | None = None  # what Ready means in this phase, set by prepare()
        self.measured_pid: int | None = None  # the Kopf process whose memory and CPU are measured
        self.prepare()

    def manifest(self, name: str) -> dict[str, Any]:
        body = self.run.helpers.neuron_model(name, "model-source", cores=1, replicas=1)
        body["metadata"]["namespace"] = NAMESPACE
        return body

    def prepare(self) -> None:
        """Before the clock: start watches and processes."""

    def wait_watching(self, timeout: float = 120) -> None:
        """Until the Kopf process has listed every kind the operator watches (its watches follow at once).

        Not the watch requests themselves: the apiserver logs a watch only once its response starts, and with no
        event to send that can be a minute later."""
        since, deadline = time.time() - 5, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.env.operator.poll() is not None:
                raise RuntimeError(f"{self.logs.name}: the Kopf process exited with {self.env.operator.returncode}")
            audit = read_audit(self.host.audit_log, since)
            if {r.resource for r in audit if r.actor == "kopf" and r.verb == "list"} >= WATCHED:
                time.sleep(1)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.logs.name}: the Kopf process never listed all of {sorted(WATCHED)}")

    def create_model(self, name: str) -> None:
        helpers = self.run.helpers
        self.custom.create_namespaced_custom_object(
            helpers.GROUP, helpers.VERSION, NAMESPACE, helpers.PLURAL, self.manifest(name)
        )

    def create(self, name: str) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> tuple[bool, dict[str, float]]:
        """Whether all got Ready in time, and when each did."""
        assert self.ready_watch is not None, "prepare() sets what Ready means"
        return self.ready_watch.wait(set(self.names), timeout), dict(self.ready_watch.ready)

    def stop(self) -> None:
        for watch in (self.jobs, self.ready_watch):
            if watch is not None:
                watch.stopping.set()
        self.env.stop_operator()

    def serving(self, model: Any) -> dict[str, Any]:
        from neuronmodel_operator.builders import serving_deployment

        return serving_deployment(model, self.config, model.rewrite_id())


class BareDeployments(Phase):
    def prepare(self) -> None:
        for model in self.models.values():  # what the rewrite Job would have written
            shutil.copytree(self.run.rewritten, self.store / model.rewrite_path(model.rewrite_id()) / "1")
        self.ready_watch = ReadyWatch(self.host, ("apps", "v1", "deployments"), deployment_available)

    def create(self, name: str) -> None:
        self.apps.create_namespaced_deployment(NAMESPACE, self.serving(self.models[name]))


class Pipeline(BareDeployments):
    """The operator's objects created by a script the moment each is due: Job first, then Deployment and Service."""

    def prepare(self) -> None:
        self.served: set[str] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(CREATE_THREADS)
        self.jobs = ReadyWatch(self.host, ("batch", "v1", "jobs"), job_complete, on_event=self._job_event)
        self.ready_watch = ReadyWatch(self.host, ("apps", "v1", "deployments"), deployment_available)

    def _job_event(self, job: dict[str, Any]) -> None:
        name = model_of(job["metadata"]["name"])
        with self.lock:
            if not job_complete(job) or name in self.served:
                return
            self.served.add(name)
        self.pool.submit(self._serve, self.models[name])

    def _serve(self, model: Any) -> None:
        from neuronmodel_operator.builders import serving_service

        self.apps.create_namespaced_deployment(NAMESPACE, self.serving(model))
        self.core.create_namespaced_service(NAMESPACE, serving_service(model))

    def create(self, name: str) -> None:
        from neuronmodel_operator.builders import rewrite_job

        self.batch.create_namespaced_job(NAMESPACE, rewrite_job(self.models[name], self.config))

    def stop(self) -> None:
        self.pool.shutdown(wait=True)
        super().stop()


class Operator(Phase):
    actors = frozenset({"operator", "kopf"})
    process = "operator"

    def prepare(self) -> None:
        self.env.start_operator()
        self.measured_pid = self.env.operator.pid
        self.wait_watching()
        self.jobs = ReadyWatch(self.host, ("batch", "v1", "jobs"), job_complete)  # for the rewrite's share only
        helpers = self.run.helpers
        self.ready_watch = ReadyWatch(self.host, (helpers.GROUP, helpers.VERSION, helpers.PLURAL), model_ready)

    def create(self, name: str) -> None:
        self.create_model(name)


class MinimalKopf(Pipeline):
    """Kopf alone on the operator's event streams: the pipeline's children appear and change as the operator's
    would, and a NeuronModel is created beside each Job, but nothing reconciles the models (none goes Ready)."""

    actors = frozenset({"kopf"})
    process = "minimal-kopf"

    def prepare(self) -> None:
        self.log = self.logs / "minimal-kopf.log"
        with self.log.open("wb") as out:
            # Env.stop_operator stops whatever process Env.operator holds: this one too.
            self.env.operator = subprocess.Popen(
                [sys.executable, str(HERE / "minimal_kopf_operator.py"), "-n", NAMESPACE, "--children"],
                env=dict(os.environ, KUBECONFIG=str(self.host.view.kubeconfig)),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.measured_pid = self.env.operator.pid
        self.wait_watching()
        super().prepare()

    def create(self, name: str) -> None:
        self.create_model(name)
        super().create(name)

    def wait(self, timeout: float) -> tuple[bool, dict[str, float]]:
        """The pipeline's Deployments available, and every NeuronModel seen by Kopf."""
        deadline = time.monotonic() + timeout
        complete, ready = super().wait(timeout)
        while time.monotonic() < deadline:
            lines = self.log.read_text(errors="replace").splitlines()
            if max((int(line.split()[1]) for line in lines if line.startswith("seen ")), default=0) >= self.size:
                return complete, ready
            time.sleep(0.2)
        return False, ready


PHASE_CLASSES: dict[str, type[Phase]] = {
    "deployments": BareDeployments,
    "pipeline": Pipeline,
    "kopf": MinimalKopf,
    "operator": Operator,
}


def create_all(names: list[str], create: Callable[[str], None]) -> dict[str, float]:
    """Create every object from a few threads at once; returns when each create call was made."""
    started: dict[str, float] = {}

    def one(name: str) -> None:
        started[name] = time.time()
        create(name)

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(one, names))
    return started


def run_phase(run: Run, size: int, name: str) -> dict[str, Any]:
    """One phase on a fresh control plane: set up, create all at once, wait for all Ready, idle, then count."""
    nodes = math.ceil(size * 1.1 / CORES_PER_NODE) + 1
    logs = run.logs / f"{size}-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic()
    host = Host(nodes, logs / "cluster.log")
    phase: Phase | None = None
    try:
        phase = PHASE_CLASSES[name](run, size, host, logs)
        pids = dict(host.pids) | ({phase.process: phase.measured_pid} if phase.measured_pid else {})
        profiler = start_py_spy(phase.measured_pid, logs) if (run.py_spy and name == "operator") else None
        cpu_start = cpu_snapshot(pids)
        setup_seconds = time.monotonic() - wall
        t0 = time.time()
        created = create_all(phase.names, phase.create)
        t_created = time.time()
        complete, ready = phase.wait(run.timeout)
        t_ready = time.time()
        cpu_ready = cpu_snapshot(pids)
        result: dict[str, Any] = {
            "phase": name,
            "size": size,
            "nodes": nodes,
            "complete": complete,
            "ready": len(ready),
            "setup_seconds": round(setup_seconds, 1),
            "create_seconds": round(t_created - t0, 2),
            "all_ready_seconds": round(t_ready - t0, 2),
            "latency": percentiles([ready[n] - created[n] for n in ready if n in created]),
            "cpu_seconds": cpu_delta(cpu_start, cpu_ready),
        }
        if phase.jobs is not None:
            result["job_complete_latency"] = percentiles(
                [phase.jobs.ready[j] - created[model_of(j)] for j in phase.jobs.ready]
            )
        if profiler is not None:
            result["py_spy"] = stop_py_spy(profiler)
        t_idle = t_end = t_ready
        if phase.measured_pid is not None:
            result["memory_mib_at_ready"] = memory_mib(phase.measured_pid)
            time.sleep(run.settle)
            t_idle = time.time()
            cpu_idle = cpu_snapshot(pids)
            time.sleep(run.idle)
            t_end = time.time()
            result["idle_seconds"] = round(t_end - t_idle, 1)
            result["idle_cpu_seconds"] = cpu_delta(cpu_idle, cpu_snapshot(pids))
            result["memory_mib_end"] = memory_mib(phase.measured_pid)
        requests = read_audit(host.audit_log, since=t0 - 1)
        if run.keep_audit:
            shutil.copy(host.audit_log, logs / "audit.log")
        result["requests_by_actor"] = by_actor(requests, t0, t_ready)
        actors = set(phase.actors) or {"bench"}
        result["requests"] = tally(requests, actors, t0, t_ready)
        if phase.measured_pid is not None:
            result["requests_settle"] = tally(requests, actors, t_ready, t_idle)
            result["requests_idle"] = tally(requests, actors, t_idle, t_end)
        if name == "operator":
            result["named_writes_per_model"] = writes_per_model(requests, actors, ready)
        result["phase_wall_seconds"] = round(time.monotonic() - wall, 1)
        return result
    finally:
        if phase is not None:
            phase.stop()
        host.close()


# py-spy ------------------------------------------------------------------------------------------------------------


def start_py_spy(pid: int | None, logs: Path) -> tuple[subprocess.Popen, Path] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if pid is None or not spy.exists():
        print(f"no py-spy at {spy} (.venv/bin/pip install py-spy): not profiling", file=sys.stderr)
        return None
    out = logs / "py-spy.txt"
    with (logs / "py-spy.log").open("wb") as log:
        popen = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "50",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return popen, out


def stop_py_spy(profiler: tuple[subprocess.Popen, Path]) -> dict[str, Any]:
    """Stop recording; the functions most often on top of the stack (own) and anywhere in it (inclusive)."""
    popen, out = profiler
    popen.send_signal(signal.SIGINT)
    popen.wait(120)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]  # per function, not per line
        if not frames or not count.isdigit():
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    ours = [(f, n) for f, n in inclusive.most_common() if "neuronmodel_operator" in f or "kopf/_core" in f]
    return {"samples": total, "own_top": own.most_common(15), "inclusive_top": ours[:20], "raw": str(out)}


# Report ------------------------------------------------------------------------------------------------------------


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per size and phase; "writes/model" are the operator's (Kopf's) or, for a floor, this script's."""
    floors = {(r["size"], r["phase"]): r["all_ready_seconds"] for r in results}
    lines = [
        "| N | phase | all Ready s | / pipeline | / deployments | latency p50 / p95 / max s | writes/model "
        "| reads/model | idle writes / reads | peak RSS MiB | own CPU s | agent CPU s (+rewrites) | apiserver CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict[str, Any], floor: str) -> str:
        seconds = floors.get((r["size"], floor))
        return f"{r['all_ready_seconds'] / seconds:.2f}" if seconds else ""

    for r in results:
        n, cpu, req = r["size"], r["cpu_seconds"], r["requests"]
        lat = r["latency"]
        latency = f"{lat['p50']} / {lat['p95']} / {lat['max']}" if lat else ""
        idle = r.get("requests_idle")
        idle_text = f"{idle['writes']} / {idle['reads']}" if idle else ""
        rss = (r.get("memory_mib_end") or {}).get("VmHWM", "")
        status = "" if r["complete"] else f" (TIMEOUT: {r['ready']}/{n})"
        lines.append(
            f"| {n} | {r['phase']}{status} | {r['all_ready_seconds']} | {ratio(r, 'pipeline')} "
            f"| {ratio(r, 'deployments')} | {latency} "
            f"| {req['writes'] / n:.2f} | {req['reads'] / n:.2f} "
            f"| {idle_text} | {rss} | {cpu.get('operator', cpu.get('minimal-kopf', ''))} "
            f"| {cpu.get('agent', 0)} (+{cpu.get('agent-children', 0)}) | {cpu.get('kube-apiserver', '')} |"
        )
    lines.append("")
    lines.append("Operator requests until all Ready (per model), by verb and resource:")
    lines.append("")
    for r in results:
        if r["phase"] == "operator":
            counts = ", ".join(f"{k} {v / r['size']:.2f}" for k, v in r["requests"]["by_verb_resource"].items())
            lines.append(f"- N={r['size']}: {counts}")
            idle = r["requests_idle"]["by_verb_resource"]
            lines.append(
                f"  - idle {r['idle_seconds']} s: {idle or 'none'}; settle: "
                f"{r['requests_settle']['by_verb_resource'] or 'none'}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50", help="comma-separated model counts (default: a quick 50)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--idle", type=float, default=60, help="idle window after all Ready, seconds")
    parser.add_argument("--settle", type=float, default=10, help="pause between all Ready and the idle window")
    parser.add_argument("--timeout", type=float, default=3600, help="longest wait for all Ready, seconds")
    parser.add_argument("--py-spy", action="store_true", help="profile the operator phase with py-spy")
    parser.add_argument("--keep-audit", action="store_true", help="keep each phase's audit log beside the results")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    parser.add_argument("--serve-cluster", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Stopped by a signal, still stop what we started (the operator, the control plane): finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    if args.serve_cluster is not None:
        return serve_cluster(args.serve_cluster)
    sizes = [int(s) for s in args.sizes.split(",")]
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"operator_scale-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    try:
        from neuron_modelgen import Options, build_model

        helpers = load_helpers()
        source = build_model(scratch / "source", Options(kind="tf1"))
        rewritten = scratch / "rewritten"
        cli = Path(sys.executable).parent / "tf-neuron-auto-multicore"
        subprocess.run(
            [str(cli), str(source), "--num_cores", "1", "--new_model_dir", str(rewritten)],
            check=True,
            capture_output=True,
        )
        run = Run(
            source,
            rewritten,
            scratch,
            out.with_suffix(".logs"),
            helpers,
            args.settle,
            args.idle,
            args.timeout,
            args.py_spy,
            args.keep_audit,
        )
        results: list[dict[str, Any]] = []
        started = time.monotonic()
        for size in sizes:
            for name in phases:
                result = run_phase(run, size, name)
                results.append(result)
                print(
                    f"N={size} {name}: all Ready in {result['all_ready_seconds']} s "
                    f"(phase {result['phase_wall_seconds']} s)",
                    file=sys.stderr,
                    flush=True,
                )
                out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "results": results}, indent=1))
        print(markdown(results))
        print(f"\nresults: {out} (run took {time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
