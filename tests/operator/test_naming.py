"""Names and labels: stable, bounded to 63 characters, valid DNS-1123 labels and unique."""

from __future__ import annotations

import hashlib
import re

from unit_helpers import DNS1123_LABEL

from neuronmodel_operator.naming import (
    COMPONENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MAX_NAME,
    MODEL_LABEL,
    bounded,
    digest,
    job_name,
    labels,
    model_label,
    selector,
    selector_string,
    serving_name,
)


def test_digest_is_stable_and_independent_of_key_order() -> None:
    value = {"source": {"pvc": {"claimName": "models"}}, "numCores": 4}
    same = {"numCores": 4, "source": {"pvc": {"claimName": "models"}}}
    assert digest(value) == digest(same)
    # sha256 of the canonical JSON: the hash must not change between releases, or every Job would re-run.
    assert digest("resnet50") == hashlib.sha256(b'"resnet50"').hexdigest()[:10]
    assert len(digest(value)) == 10 and len(digest(value, 8)) == 8
    assert all(c in "0123456789abcdef" for c in digest(value))


def test_digest_differs_for_different_values() -> None:
    assert digest({"numCores": 2}) != digest({"numCores": 4})
    assert digest([1, 2]) != digest([2, 1])


def test_bounded_keeps_short_names_unchanged() -> None:
    assert bounded("resnet50") == "resnet50"
    assert bounded("resnet50", "-batching") == "resnet50-batching"
    exactly = "a" * (MAX_NAME - len("-x")) + "-x"
    assert bounded(exactly) == exactly


def test_bounded_long_names_are_short_valid_and_unique() -> None:
    base = "bert-large-uncased-whole-word-masking-finetuned-squad-neuronx-compiled"
    first, second = f"{base}-variant-a", f"{base}-variant-b"
    assert len(first) > MAX_NAME
    a, b = bounded(first), bounded(second)
    assert a != b
    for name in (a, b):
        assert len(name) <= MAX_NAME
        assert DNS1123_LABEL.match(name), name
        assert name.startswith(base[:40])


def test_bounded_with_suffix_keeps_the_suffix() -> None:
    name = "m" * 80
    result = bounded(name, "-batching")
    assert len(result) <= MAX_NAME and result.endswith("-batching")
    assert DNS1123_LABEL.match(result)


def test_bounded_does_not_leave_a_dash_before_the_hash() -> None:
    # The cut falls right after a dash: it must be stripped so no "--" or trailing dash appears.
    name = "a" * 53 + "-" + "b" * 20
    result = bounded(name)
    assert len(result) <= MAX_NAME
    assert "--" not in result
    assert DNS1123_LABEL.match(result)


def test_job_name_of_a_253_char_model_stays_a_valid_label() -> None:
    model = ("resnet50-" * 40)[:252] + "z"
    assert len(model) == 253
    rewrite_id = digest(["source", 4, 1, "image"])
    name = job_name(model, rewrite_id)
    assert len(name) <= MAX_NAME
    assert DNS1123_LABEL.match(name), name
    assert name.endswith(f"-rewrite-{rewrite_id}")
    # Two long models differing only at the end still get different Jobs.
    other = model[:-1] + "y"
    assert job_name(other, rewrite_id) != name


def test_job_name_of_a_short_model_is_readable() -> None:
    assert job_name("resnet50", "abcdef0123") == "resnet50-rewrite-abcdef0123"


def test_labels_selector_and_selector_string_agree() -> None:
    model = "resnet50"
    serving = labels(model, "serving")
    assert serving == {
        "app.kubernetes.io/name": "neuronmodel",
        "app.kubernetes.io/instance": "resnet50",
        COMPONENT_LABEL: "serving",
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: "resnet50",
    }
    sel = selector(model)
    assert sel == {MODEL_LABEL: "resnet50", COMPONENT_LABEL: "serving"}
    # The selector matches the serving pods' labels, not the rewrite Job's pods.
    assert sel.items() <= serving.items()
    assert not sel.items() <= labels(model, "rewrite").items()
    assert selector_string(model) == "serving.neuron.dev/model=resnet50,app.kubernetes.io/component=serving"
    parsed = dict(part.split("=", 1) for part in selector_string(model).split(","))
    assert parsed == sel


def test_labels_of_a_long_model_are_valid_label_values() -> None:
    model = "x" * 200
    value = model_label(model)
    assert len(value) <= MAX_NAME and DNS1123_LABEL.match(value)
    assert labels(model, "serving")[MODEL_LABEL] == value
    assert selector(model)[MODEL_LABEL] == value
    assert f"{MODEL_LABEL}={value}" in selector_string(model)
    assert serving_name(model) == value


DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def test_serving_name_is_a_valid_service_name_for_any_model_name() -> None:
    """NeuronModel names are DNS subdomains; Service names must be DNS-1035 labels (no dots, a letter first)."""
    names = ["resnet50", "bert.base", "2-models", "x" * 253, "a.b." * 50 + "c"]
    served = [serving_name(n) for n in names]
    assert served[0] == "resnet50"
    for name in served:
        assert len(name) <= MAX_NAME and re.match(DNS1035_LABEL, name), name
    assert len(set(served)) == len(served)
    assert serving_name("bert.base") != serving_name("bert-base")  # adjusted names cannot collide with real ones
