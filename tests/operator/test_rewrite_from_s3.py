"""The rewrite reading an s3:// source in place (the local S3): the same output as from disk, the same refusals,
interrupted transfers resumed, no scratch copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3 import clean_aws_env

from localcluster import s3server
from localcluster.s3server import REFUSED, REGION, refusals, upload_tree
from neuron_rewrite import InvalidModelError, NotReplicableError, rewrite_model
from synthetic_models import saved_model, tree_digest, write_model

BUCKET = "compiled-models"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(endpoint, log) of a local S3 holding a SavedModel, a base path and a pipelined model."""
    tmp = tmp_path_factory.mktemp("s3-source")
    log = tmp / "s3.log"
    with s3server.running(log) as endpoint:
        models = tmp / "models"
        # 3 NeuronOps of 9 MiB of NEFF each: saved_model.pb is copied in several parallel parts around its edits.
        write_model(models / "resnet", saved_model(functions=2, executable=os.urandom(9 << 20)))
        write_model(models / "base" / "1", saved_model(functions=0))
        write_model(models / "base" / "3", saved_model(functions=1))
        write_model(models / "pipelined", saved_model(functions=0, pipeline=2))
        (models / "resnet" / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(3 << 20))
        (models / "plain" / "variables").mkdir(parents=True)
        (models / "plain" / "variables" / "variables.index").write_bytes(b"x")
        upload_tree(endpoint, BUCKET, "", models)
        yield endpoint, models


@pytest.fixture(autouse=True)
def aws(server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The pod's environment, as IRSA and the operator set it: a region and the endpoint."""
    clean_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server[0])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def test_a_savedmodel_rewritten_from_s3_is_the_one_rewritten_from_disk(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    _, models = server
    from_disk = rewrite_model(models / "resnet", tmp_path / "disk", 4)
    from_s3 = rewrite_model(f"s3://{BUCKET}/resnet", tmp_path / "s3", 4)
    assert tree_digest(tmp_path / "s3") == tree_digest(tmp_path / "disk")
    assert from_s3.source == f"s3://{BUCKET}/resnet"
    assert from_s3.bytes_written == from_disk.bytes_written
    assert [len(m.neuron_ops) for m in from_s3.models] == [3]


def test_a_base_path_on_s3_gives_the_version_tf_serving_would_load(server: tuple[str, Path], tmp_path: Path) -> None:
    report = rewrite_model(f"s3://{BUCKET}/base/", tmp_path / "latest", 2, select_version="latest", rewrite_id="abc")
    assert report.source_version == 3 and len(report.models[0].neuron_ops) == 2
    assert (tmp_path / "latest" / "saved_model.pb").is_file() and (
        tmp_path / "latest" / ".neuron-rewrite.json"
    ).is_file()
    with pytest.raises(InvalidModelError, match=r"s3://compiled-models/base: no version 7 \(versions present: 1, 3\)"):
        rewrite_model(f"s3://{BUCKET}/base", tmp_path / "seven", 2, select_version=7)


@pytest.mark.parametrize(
    ("prefix", "error", "words"),
    [
        ("nothing-here", InvalidModelError, "s3://compiled-models/nothing-here: no object under this prefix"),
        (
            "plain",
            InvalidModelError,
            "s3://compiled-models/plain: not a SavedModel (no saved_model.pb) nor a TF Serving",
        ),
        ("pipelined", NotReplicableError, "pipeline"),
    ],
)
def test_what_is_refused_from_disk_is_refused_from_s3_naming_the_object(
    prefix: str, error: type[Exception], words: str, tmp_path: Path
) -> None:
    with pytest.raises(error) as refused:
        rewrite_model(f"s3://{BUCKET}/{prefix}", tmp_path / "out", 2)
    assert words in str(refused.value)
    assert not (tmp_path / "out").exists()  # nothing appears: all or nothing


def test_a_missing_bucket_is_named_in_the_services_words(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"s3://no-such-bucket/m: NoSuchBucket: "):
        rewrite_model("s3://no-such-bucket/m", tmp_path / "out", 2)


def test_an_interrupted_transfer_is_resumed_where_it_broke(server: tuple[str, Path], tmp_path: Path) -> None:
    endpoint, models = server
    key = "resnet/variables/variables.data-00000-of-00001"
    fault = json.dumps({"key": key, "after": 100_000, "times": 2}).encode()
    urllib.request.urlopen(urllib.request.Request(endpoint + s3server.FAULTS_PATH, data=fault, method="POST")).close()
    rewrite_model(f"s3://{BUCKET}/resnet", tmp_path / "s3", 2)
    rewrite_model(models / "resnet", tmp_path / "disk", 2)
    assert tree_digest(tmp_path / "s3") == tree_digest(tmp_path / "disk")
    log = Path(str(models.parent / "s3.log")).read_text()
    assert log.count(f"fault: dropped GET /{BUCKET}/{key} after 100000 bytes") == 2, log[-2000:]


def test_the_cli_takes_an_s3_model_dir(tmp_path: Path) -> None:
    out = tmp_path / "store" / "ml" / "resnet" / "1"
    done = subprocess.run(
        [sys.executable, "-m", "neuron_rewrite", f"s3://{BUCKET}/resnet", "--num_cores", "2", "--new_model_dir",
         str(out), "--json"],
        capture_output=True, text=True, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == f"s3://{BUCKET}/resnet"
    assert (out / "saved_model.pb").is_file()


def test_the_bucket_is_read_in_the_region_aws_default_region_names(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator sets from ``spec.source.s3.region``: every request is signed for the bucket's region."""
    endpoint, models = server
    upload_tree(endpoint, "eu-models", "resnet/", models / "resnet", region="eu-west-1")
    log = models.parent / "s3.log"
    before = len(refusals(log))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    rewrite_model("s3://eu-models/resnet", tmp_path / "out", 2)
    assert refusals(log)[before:] == []
    # AWS_REGION alone is not what botocore reads: S3 refuses the first request, botocore redirects.
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    rewrite_model("s3://eu-models/resnet", tmp_path / "again", 2)
    assert refusals(log)[before:] == [f"{REFUSED} GET /eu-models: signed for us-east-1, bucket in eu-west-1"]


def test_a_bucket_in_another_region_than_the_configured_one_is_refused_in_s3s_words(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A region given (spec.source.s3.region, or the cluster's from the pod identity webhook) is kept: botocore is
    not let to re-send the request to the bucket's region, and S3's refusal is what the model's status says."""
    endpoint, models = server
    upload_tree(endpoint, "far-models", "resnet/", models / "resnet", region="eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    with pytest.raises(InvalidModelError) as refused:
        rewrite_model("s3://far-models/resnet", tmp_path / "out", 2)
    assert str(refused.value) == (
        "s3://far-models/resnet: AuthorizationHeaderMalformed: The authorization header is malformed; the region "
        "'us-west-2' is wrong; expecting 'eu-west-1' (the bucket is in eu-west-1, not in the configured region "
        "us-west-2)"
    )
    assert not (tmp_path / "out").exists()
