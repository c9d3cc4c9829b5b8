"""The start-up API calls have the reconcile's timeouts: a hung apiserver connection must fail and be retried, not
leave the operator waiting for ever, unready and silent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kubernetes
import pytest

from neuronmodel_operator import crd, handlers
from neuronmodel_operator.reconcile import REQUEST_TIMEOUT


class Recorder:
    """Stands for a client API class: records each call's keyword arguments and answers ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.calls = answer, []

    def __call__(self, *_: Any) -> Recorder:
        return self

    def __getattr__(self, verb: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((verb, kwargs))
            return self.answer

        return call


def test_the_crd_digest_check_has_the_reconciles_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    annotated = SimpleNamespace(metadata=SimpleNamespace(annotations={crd.DIGEST_ANNOTATION: crd.SCHEMA_DIGEST}))
    api = Recorder(annotated)
    monkeypatch.setattr(crd.client, "ApiextensionsV1Api", api)
    assert crd.stale_crd_message() is None
    assert api.calls == [("read_custom_resource_definition", {"_request_timeout": REQUEST_TIMEOUT})]


def test_the_api_groups_check_has_the_reconciles_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = [
        SimpleNamespace(name=name, preferred_version=SimpleNamespace(group_version=f"{name}/v1"))
        for name in handlers.REQUIRED_GROUPS
    ]
    api = Recorder(SimpleNamespace(groups=groups))
    monkeypatch.setattr(kubernetes.client, "ApisApi", api)
    assert handlers._wait_for_api_groups().keys() == handlers.REQUIRED_GROUPS
    assert api.calls == [("get_api_versions", {"_request_timeout": REQUEST_TIMEOUT})]
