"""The simulated server's model check: it follows the model on disk, though it parses each graph only once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from localcluster.serving import check_serving_container
from neuron_modelgen import Options, build_model
from neuron_rewrite import rewrite_model
from neuron_rewrite.neff import V1
from synthetic_models import saved_model, write_model

SERVER = SimpleNamespace(
    command=["tensorflow_model_server_neuronx"], args=["--model_name=m", "--model_base_path=/models/m"]
)


def check(base: Path, cores: int) -> str | None:
    return check_serving_container(SERVER, {}, cores, lambda path: path.replace("/models/m", str(base)))


def test_a_version_replaced_in_place_is_checked_again(tmp_path: Path) -> None:
    compiled = write_model(tmp_path / "compiled", saved_model())
    base = tmp_path / "base"
    base.mkdir()
    rewrite_model(compiled, base / "1", 2)
    assert check(base, 2) is None
    assert "is tagged _automatic_multicore=2 but the pod has 1" in (check(base, 1) or "")
    rewrite_model(compiled, base / "1", 1, force=True)  # the same version, retagged: a new graph file
    assert check(base, 1) is None
    assert "is tagged _automatic_multicore=1 but the pod has 2" in (check(base, 2) or "")
    (base / "1" / "saved_model.pb").write_bytes(b"\x0a\xff")  # edited in place into garbage
    assert (check(base, 1) or "").startswith("failed to load servable m version 1:")


def test_only_the_newest_numbered_child_is_loaded_and_it_must_hold_the_savedmodel(tmp_path: Path) -> None:
    compiled = write_model(tmp_path / "compiled", saved_model())
    base = tmp_path / "base"
    assert "Could not find base path /models/m for servable m" in (check(base, 2) or "")
    base.mkdir()
    assert "No versions of servable m found under base path /models/m" in (check(base, 2) or "")
    # A TF Serving base path published as one version (what a base-path source copied whole would give).
    rewrite_model(compiled, base / "1" / "1", 2)
    assert check(base, 2) == (
        "failed to load servable m version 1: SavedModel file does not exist at: "
        "/models/m/1/{saved_model.pbtxt|saved_model.pb}"
    )
    rewrite_model(compiled, base / "2", 2)
    assert check(base, 2) is None  # version 2 is the newest: version 1's layout no longer matters
    (base / "3").write_text("a file named as a number is a version too")
    assert "version 3: SavedModel file does not exist" in (check(base, 2) or "")


def test_a_monitoring_config_it_cannot_read_stops_the_server_as_the_real_one(tmp_path: Path) -> None:
    base = tmp_path / "base"
    rewrite_model(write_model(tmp_path / "compiled", saved_model()), base / "1", 2)
    config = tmp_path / "monitoring.config"
    server = SimpleNamespace(
        command=SERVER.command, args=[*SERVER.args, "--monitoring_config_file=/etc/tfserving/monitoring.config"]
    )

    def check_with_config() -> str | None:
        def to_host(path: str) -> str:
            return path.replace("/models/m", str(base)).replace("/etc/tfserving/monitoring.config", str(config))

        return check_serving_container(server, {}, 2, to_host)

    assert check_with_config() == (
        "Failed to start server. Error: NOT_FOUND: /etc/tfserving/monitoring.config; No such file or directory"
    )
    config.write_text('prometheus_config { enable: yes please, path: "/metrics" }')
    assert check_with_config() == (
        "Failed to start server. Error: INVALID_ARGUMENT: Invalid protobuf file: '/etc/tfserving/monitoring.config'"
    )
    config.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }')
    assert check_with_config() is None


def test_a_neff_of_another_neuroncore_generation_than_the_nodes_is_refused_in_the_runtimes_words(
    tmp_path: Path,
) -> None:
    """As the Neuron runtime: NRT_FAILURE(6) for a NEFF compiled for another target architecture. A NEFF that does
    not tell its generation loads anywhere (the runtime would know; the stand-in cannot, so it lets it by)."""
    inf1 = build_model(tmp_path / "inf1", Options(target=V1))  # neuron-cc's NEFF 0.6
    unknown = build_model(tmp_path / "unknown", Options())
    for compiled, base in ((inf1, tmp_path / "inf1-base"), (unknown, tmp_path / "unknown-base")):
        rewrite_model(compiled, base / "1", 2)

    def on(base: Path, instance_type: str) -> str | None:
        return check_serving_container(SERVER, {}, 2, lambda path: path.replace("/models/m", str(base)), instance_type)

    refusal = on(tmp_path / "inf1-base", "inf2.xlarge") or ""
    assert refusal.startswith("failed to load servable m version 1: NeuronOp "), refusal
    assert refusal.endswith(
        ": NRT_FAILURE(6): The NEFF was compiled for a different target architecture than the current instance "
        "(NeuronCore-v1 NEFF, inf2.xlarge has NeuronCore-v2)"
    ), refusal
    assert on(tmp_path / "inf1-base", "inf1.xlarge") is None
    assert on(tmp_path / "unknown-base", "inf2.xlarge") is None
