# The training image of serving/k8s/train-tfjob.yaml (the Kubeflow TFJob): this package with its
# pinned stack (TensorFlow 2.20, tf-keras, TFRS 0.7.7, ScaNN) on Python 3.11, `tfrs-coldstart` as
# the entry point. The serving images are the Dockerfile's; this one trains.
#
#   docker build -f train.Dockerfile -t tfrs-coldstart-train:0.1.0 .
#
# Build context: the repository root; train.Dockerfile.dockerignore keeps only the package
# sources. Like the serving images it has not been built on the machine this project was
# written on (no Docker engine there); tests/test_distributed.py checks that its COPY sources
# exist and that the TFJob runs its entry point.
FROM python:3.11-slim AS train

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tfrs-coldstart
COPY setup.cfg pyproject.toml README.md ./
COPY tfrs_coldstart/ tfrs_coldstart/
RUN pip install . && useradd --create-home --uid 1000 trainer
USER 1000
WORKDIR /home/trainer
ENTRYPOINT ["tfrs-coldstart"]
CMD ["--help"]
