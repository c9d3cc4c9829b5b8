"""The data path as on EKS: source -> rewrite Job -> store -> TF Serving, against the real local control plane.

A base-path source is served where TF Serving loads it; an operator upgrade re-runs nothing; a published rewrite is
never run or written again; the store's owner decides whether the rewrite may write, and the status says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import GROUP, PLURAL, VERSION, Env, LocalS3, neuron_model, serving_pods, wait_for
from localcluster.s3server import refusals, upload_tree

pytestmark = pytest.mark.cluster


def published(env: Env, name: str, store: Path | None = None) -> Path:
    """The version folder the model's current rewrite was published as, in the store (the env's by default)."""
    status = env.status(name)
    version = str(env.model(name)["spec"]["model"]["version"])
    return (store or env.tmp / "store") / status["rewrite"]["path"] / version


def identity(path: Path) -> tuple[int, int]:
    stat = (path / "saved_model.pb").stat()
    return stat.st_ino, stat.st_mtime_ns


def job_names(env: Env) -> set[str]:
    return {j.metadata.name for j in env.jobs()}


def test_a_base_path_source_serves_its_newest_version_where_tf_serving_loads_it(
    env: Env, models: dict[str, Path]
) -> None:
    base = env.tmp / "base"
    shutil.copytree(models["bert"], base / "1")
    shutil.copytree(models["resnet50"], base / "3")
    (base / "2").mkdir()  # an older version that is broken: TF Serving never looks at it, nor does the rewrite
    env.hostpath_claim("tutorial-upload", base)
    assert env.apply(neuron_model("based", "tutorial-upload", cores=2, rewrite={"backoffLimit": 0})).returncode == 0
    status = env.wait_phase("based", "Ready")

    assert status["rewrite"]["sourceVersion"] == 3
    assert "(source version 3)" in env.condition("based", "Ready")["message"]
    version = published(env, "based")
    assert (version / "saved_model.pb").is_file()  # directly inside: what the server loads
    assert [p.name for p in version.parent.iterdir()] == ["1"]

    # A version named in the spec: a new rewrite, served once published.
    env.patch_spec("based", {"source": {"pvc": {"claimName": "tutorial-upload"}, "version": 1}})
    wait_for(lambda: env.status("based")["rewrite"].get("sourceVersion") == 1, what="source version 1 rewritten")
    env.wait_phase("based", "Ready")

    # A version that is not there fails the rewrite with the versions that are; the pods keep serving.
    env.patch_spec("based", {"source": {"pvc": {"claimName": "tutorial-upload"}, "version": 7}})
    status = env.wait_phase("based", "Degraded")
    message = env.condition("based", "RewriteSucceeded")["message"]
    assert "7" in message and "1, 2, 3" in message, message


def test_an_operator_upgrade_with_a_new_rewrite_image_reruns_nothing(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("upgraded", "compiled")).returncode == 0
    env.wait_phase("upgraded", "Ready")
    jobs = job_names(env)
    template = env.apps.read_namespaced_deployment("upgraded", env.namespace).spec.template.to_dict()
    before = identity(published(env, "upgraded"))

    env.stop_operator()
    env.start_operator(rewrite_image="local/rewrite:next-release")
    env.scale_and_wait("upgraded", 2)

    assert job_names(env) == jobs
    assert env.apps.read_namespaced_deployment("upgraded", env.namespace).spec.template.to_dict() == template
    assert identity(published(env, "upgraded")) == before
    # A new model gets the new image: the new operator is the one that acted above.
    env.apply(neuron_model("fresh", "compiled", cores=1))
    wait_for(lambda: len(env.jobs()) == 2, what="the new model's Job")
    images = {j.spec.template.spec.containers[0].image for j in env.jobs() if j.metadata.name not in jobs}
    assert images == {"local/rewrite:next-release"}


def test_a_published_rewrite_is_never_run_or_written_again(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("kept", "compiled")).returncode == 0
    status = env.wait_phase("kept", "Ready")
    published_at, before = status["rewrite"]["publishedAt"], identity(published(env, "kept"))

    # A completed Job deleted by someone (a TTL, a clean-up script) is not run again.
    (job,) = env.jobs()
    env.batch.delete_namespaced_job(job.metadata.name, env.namespace, propagation_policy="Background")
    wait_for(lambda: not env.jobs(), what="the Job gone")
    env.scale_and_wait("kept", 2)
    assert not env.jobs()
    assert env.status("kept")["rewrite"]["publishedAt"] == published_at
    assert identity(published(env, "kept")) == before

    # With the status lost too, the Job runs, finds the rewrite published and leaves it as it is.
    env.stop_operator()
    env.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, env.namespace, PLURAL, "kept", {"status": {"rewrite": {"publishedAt": None}}}
    )
    env.start_operator()
    wait_for(lambda: env.status("kept")["rewrite"].get("reused") is True, what="the rewrite found published")
    env.wait_phase("kept", "Ready")
    assert identity(published(env, "kept")) == before
    assert "(found already published in the store)" in env.condition("kept", "RewriteSucceeded")["message"]


def test_reverting_num_cores_mid_rollout_rewrites_nothing_the_old_pods_serve(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("reverted", "compiled", cores=2)).returncode == 0
    env.wait_phase("reverted", "Ready")
    (old_job,) = env.jobs()
    old_path, before = published(env, "reverted"), identity(published(env, "reverted"))

    # The new rewrite publishes, the Deployment moves to it, but its pods cannot schedule: the rollout hangs.
    env.patch_spec("reverted", {"numCores": 4, "nodeSelector": {"example.com/no-such-node": "true"}})

    def rolling() -> dict[str, Any] | None:
        deployment = env.apps.read_namespaced_deployment("reverted", env.namespace)
        new_id = env.status("reverted")["rewrite"]["id"]
        annotations = deployment.metadata.annotations or {}
        return deployment if annotations.get("serving.neuron.dev/rewrite") == new_id else None

    wait_for(rolling, what="the Deployment on the new rewrite")
    wait_for(lambda: any(p.status.phase == "Pending" for p in serving_pods(env, "reverted")), what="a new pod Pending")
    assert old_job.metadata.uid in {j.metadata.uid for j in env.jobs()}  # kept until the new rewrite serves

    env.patch_spec("reverted", {"numCores": 2, "nodeSelector": None})
    status = env.wait_phase("reverted", "Ready")
    assert status["servedCores"] == 2
    assert published(env, "reverted") == old_path and identity(old_path) == before
    wait_for(lambda: [j.metadata.uid for j in env.jobs()] == [old_job.metadata.uid], what="the other Job deleted")


def test_a_store_the_rewrite_cannot_write_says_why_and_recovers_with_the_owners_uid(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    locked = env.tmp / "nfs-export"
    locked.mkdir(mode=0o755)  # root's, as a static NFS or EFS volume without an access point is
    env.hostpath_claim("nfs-store", locked)
    manifest = neuron_model("locked", "compiled", rewrite={"backoffLimit": 0})
    manifest["spec"]["store"] = {"claimName": "nfs-store"}
    assert env.apply(manifest).returncode == 0
    env.wait_phase("locked", "Failed")
    message = env.condition("locked", "RewriteSucceeded")["message"]
    assert "Permission denied" in message and "spec.rewrite.podSecurityContext" in message, message
    assert not any(locked.iterdir())

    # The export belongs to uid 1000: the rewrite runs as its owner, at once (the Job changed), and the model serves.
    os.chown(locked, 1000, 1000)
    env.patch_spec(
        "locked", {"rewrite": {"backoffLimit": 0, "podSecurityContext": {"runAsUser": 1000, "runAsGroup": 1000}}}
    )
    env.wait_phase("locked", "Ready", timeout=90)
    assert published(env, "locked", locked).stat().st_uid == 1000


def test_serving_pods_run_as_the_spec_says_and_root_needs_saying_so(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    dlc = {"runAsUser": 0, "runAsGroup": 0, "supplementalGroups": [990]}
    manifest = neuron_model("dlc", "compiled")
    manifest["spec"]["serving"]["podSecurityContext"] = dlc  # runAsNonRoot left at its default: true
    assert env.apply(manifest).returncode == 0
    env.wait_phase("dlc", "Failed")
    ready = env.condition("dlc", "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.serving.podSecurityContext.runAsUser is 0 (root)"), ready
    assert not env.jobs()

    # Root pods need a namespace whose Pod Security level admits them (baseline does; restricted refuses them, see
    # test_status_truth), as AWS's TF Serving images, which run as root, do on EKS.
    baseline = {"pod-security.kubernetes.io/enforce": "baseline"}
    env.core.patch_namespace(env.namespace, {"metadata": {"labels": baseline}})
    manifest["spec"]["serving"]["podSecurityContext"] = {**dlc, "runAsNonRoot": False}
    manifest["spec"]["serving"]["securityContext"] = {"readOnlyRootFilesystem": False}
    assert env.apply(manifest).returncode == 0
    env.wait_phase("dlc", "Ready")
    (pod,) = serving_pods(env, "dlc")
    assert (pod.spec.security_context.run_as_user, pod.spec.security_context.run_as_non_root) == (0, False)
    assert pod.spec.security_context.supplemental_groups == [990]
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is False


def test_the_s3_region_of_the_spec_is_the_one_requests_are_signed_for(
    env: Env, models: dict[str, Path], local_s3: LocalS3
) -> None:
    # The pod identity webhook gives every IRSA pod the cluster's region (here us-west-2); the bucket is elsewhere.
    upload_tree(local_s3.endpoint, "eu-models", "resnet50/", models["resnet50"], region="eu-west-1")
    env.core.create_namespaced_service_account(
        env.namespace,
        {"metadata": {"name": "reader", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}},
    )
    manifest = neuron_model("abroad", "unused", cores=1, serviceAccountName="reader")
    manifest["spec"]["source"] = {"s3": {"uri": "s3://eu-models/resnet50/", "region": "eu-west-1"}}
    assert env.apply(manifest).returncode == 0
    env.wait_phase("abroad", "Ready")
    # botocore retries a wrong-region request in the bucket's region by itself, so the model would serve anyway:
    # the refused requests in the server's log are what show a region setting without effect.
    assert [line for line in refusals(local_s3.log) if "/eu-models" in line] == []


def test_a_long_startup_timeout_gets_a_progress_deadline_beyond_it(env: Env, models: dict[str, Path]) -> None:
    # The controller-manager's Deployment controller reports ProgressDeadlineExceeded once a rollout shows no progress
    # for progressDeadlineSeconds (600 s unless set): a model allowed 900 s to load must be given longer than that.
    env.hostpath_claim("compiled", models["bert"])
    manifest = neuron_model("large", "compiled")
    manifest["spec"]["serving"]["startupTimeoutSeconds"] = 900
    assert env.apply(manifest).returncode == 0
    env.wait_phase("large", "Ready")
    deployment = env.apps.read_namespaced_deployment("large", env.namespace)
    assert deployment.spec.progress_deadline_seconds == 900 + 300
    progressing = {c.type: c.reason for c in deployment.status.conditions}["Progressing"]
    assert progressing == "NewReplicaSetAvailable"


def cleanup_jobs(env: Env) -> list[Any]:
    return [j for j in env.jobs() if j.metadata.labels.get("app.kubernetes.io/component") == "store-cleanup"]


def test_superseded_rewrites_and_a_deleted_models_rewrites_leave_the_store(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("tidy", "compiled", cores=2)).returncode == 0
    first = env.wait_phase("tidy", "Ready")["rewrite"]["id"]
    directory = env.tmp / "store" / env.namespace / "tidy"
    assert env.status("tidy")["store"]["served"] == [first]
    assert not cleanup_jobs(env)  # a first rewrite leaves nothing to remove: no Job, no write

    def serve(cores: int) -> str:
        env.patch_spec("tidy", {"numCores": cores})
        wait_for(lambda: env.status("tidy")["rewrite"]["id"] != served[-1], what=f"the rewrite for {cores} cores")
        return env.wait_phase("tidy", "Ready")["rewrite"]["id"]

    served = [first]
    served.append(serve(1))
    freed = sum(f.stat().st_size for f in (directory / first).rglob("*") if f.is_file())
    served.append(serve(4))
    # Once the third serves in full, the first goes; the second stays, as a rollback's fallback (retainRewrites 1).
    store = wait_for(lambda: (s := env.status("tidy")["store"]).get("cleanedFor") == served[2] and s, what="cleaned")
    assert store["served"] == [served[2], served[1]]
    assert (store["removed"], store["bytesFreed"]) == (1, freed)
    assert sorted(p.name for p in directory.iterdir()) == sorted(served[1:])
    (pod,) = serving_pods(env, "tidy")
    assert pod.metadata.annotations["serving.neuron.dev/rewrite"] == served[2]
    events = env.core.list_namespaced_event(env.namespace, field_selector="reason=StoreCleaned").items
    assert any("removed 1 superseded rewrite(s)" in e.message for e in events), [e.message for e in events]
    wait_for(lambda: not cleanup_jobs(env), what="the finished clean-up Job removed")

    # Deleted: its rewrites go too, by a Job no model owns, which goes once done.
    env.cluster.cluster.kubectl("delete", "nm", "tidy", "-n", env.namespace)
    wait_for(lambda: not directory.exists(), timeout=120, what="the deleted model's store directory removed")
    wait_for(lambda: not cleanup_jobs(env), what="the deleted model's clean-up Job removed")
    events = env.core.list_namespaced_event(env.namespace, field_selector="reason=StoreCleaned").items
    assert any("rewrite(s) of a deleted NeuronModel" in e.message for e in events), [e.message for e in events]
