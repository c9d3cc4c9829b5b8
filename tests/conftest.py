pytest_plugins = ["localcluster.pytest_plugin"]
