import pytest

pytest_plugins = ["localcluster.pytest_plugin"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a local cluster of their own (the demo) run first: there can be one real kubelet node per
    machine, and the session's cluster holds it from its first use to the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)
