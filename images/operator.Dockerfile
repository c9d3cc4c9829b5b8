# The operator: this package with its `operator` extra (Kopf, the Kubernetes client), as a non-root user.
# Build from the repository root and push where your nodes pull from (the chart's image.repository):
#   docker build -f images/operator.Dockerfile -t <registry>/neuronmodel-operator:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
# The packages the wheel holds (pyproject.toml's include list), not the test harness beside them in operator/.
COPY operator/neuron_rewrite ./operator/neuron_rewrite
COPY operator/neuronmodel_operator ./operator/neuronmodel_operator
# Byte-code is compiled here, at build time: the chart runs the container with a read-only root filesystem.
RUN pip install ".[operator]" && rm -rf /src

WORKDIR /
# Matches the chart's runAsUser; no home, no shell needed at run time.
USER 65532:65532
ENTRYPOINT ["neuronmodel-operator"]
CMD ["--all-namespaces", "--standalone"]
