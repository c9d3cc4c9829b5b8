# The rewrite Job: tf-neuron-auto-multicore (standard library only: no TensorFlow, no Neuron SDK; boto3, the `s3`
# extra, for s3:// sources) and neuron-store-clean, as a non-root user.
# Build from the repository root; the chart's rewriteImage (NEURONMODEL_REWRITE_IMAGE) names it:
#   docker build -f images/rewrite.Dockerfile -t <registry>/neuronmodel-rewrite:0.1.0 .
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
RUN pip install ".[s3]" && rm -rf /src

WORKDIR /
# The operator's Jobs run as non-root with a read-only root filesystem; they write only to their volumes.
USER 65532:65532
ENTRYPOINT ["tf-neuron-auto-multicore"]
