# TF Serving images holding the models exported by `tfrs-coldstart export` (see export/README.md).
#
#   docker build -t tfrs-coldstart-serving .                  # default: TF Serving 2.20 + ScaNN ops
#   docker build --target stock -t tfrs-coldstart-serving:stock .   # official image, partitioned index
#
# The default target compiles TF Serving from source with ScaNN's TensorFlow ops linked in (stock TF
# Serving lacks them, and the last ready-made image with them, google/tf-serving-scann, is 2.11).
# The `stock` target needs no build: it is the official image serving the partitioned exports
# (`--index partitioned`, an approximate k-means index in TensorFlow's own ops).
# The build takes hours and tens of GB; it has not been run on the machine this project was
# written on (no Docker engine there). Build context: the repository root, after an export.
#
# Which versions are served: `tfrs-coldstart export` (and add-items, and the recovery of a
# killed export) rewrites export/models.config and export/models.stock.config after every
# publish, in one atomic rename each, pinning every model to the versions of its two newest
# whole releases (`specific` version policy; base paths /models/<name>, the `--serving-base`). TF
# Serving reads that file (copied, or mounted by serving/docker-compose.yml, at /models) and
# re-reads it every 10 s, so it never loads a version folder the file does not name: a release
# is switched all at once, never model by model as folders appear (export/README.md).

ARG TF_SERVING_VERSION=2.20.0
ARG TF_SERVING_DEVEL_IMAGE=tensorflow/serving:${TF_SERVING_VERSION}-devel
ARG TF_SERVING_RUNTIME_IMAGE=tensorflow/serving:${TF_SERVING_VERSION}

# ---------------------------------------------------------------------------------------------
# Stage 1: TF Serving model server with ScaNN's ops (the devel image holds the TF Serving
# sources at /tensorflow-serving and the Bazel version they need).
FROM ${TF_SERVING_DEVEL_IMAGE} AS scann-build

# ScaNN sources: google-research at the ScaNN 1.4.2 release, the wheel that exports the models
# (setup.cfg pins scann 1.4.2): the op definitions and the serialized searcher format must match.
# 634a79fb5b4b is the commit that sets scann/pyproject.toml to version 1.4.2 (tensorflow~=2.20.0,
# Python <3.14: the wheel's own metadata) and adds "1.4.2" to scann/docs/releases.md.
# Only that commit is fetched (shallow, blobs on demand, sparse: scann/ only).
ARG SCANN_REPO=https://github.com/google-research/google-research.git
ARG SCANN_COMMIT=634a79fb5b4b23237a81eac028d27b5d34a5dba4
RUN mkdir /tmp/google-research && cd /tmp/google-research && \
    git init -q && git remote add origin "${SCANN_REPO}" && \
    git sparse-checkout init --cone && git sparse-checkout set scann && \
    git fetch -q --depth 1 --filter=blob:none origin "${SCANN_COMMIT}" && \
    git checkout -q FETCH_HEAD && \
    mv /tmp/google-research/scann /scann && \
    rm -rf /tmp/google-research

# TF Serving 2.20 builds with a WORKSPACE only (its .bazelrc: --enable_bzlmod=false, Bazel 7.4.1)
# while ScaNN 1.4.2 builds with bzlmod only (MODULE.bazel, no WORKSPACE; TensorFlow from the pip
# package through @local_config_tf). So ScaNN cannot come in as a Bazel module: the script makes
# it a WORKSPACE repository (@com_google_scann), maps its MODULE.bazel dependencies onto the ones
# TensorFlow's workspace already has (abseil, protobuf, zlib, Eigen; TensorFlow itself through the
# aliases TF Serving defines for out-of-tree op libraries), adds cnpy, highway and rules_license,
# drops the Python targets, and adds ScaNN's op + kernel libraries to SUPPORTED_TENSORFLOW_OPS.
# It stops with a message naming any ScaNN dependency it does not know. Checked against the real
# TF Serving 2.20.0 and google-research 634a79fb trees by tests/test_scann_build.py.
COPY serving/scann/patch_tf_serving.py /tmp/patch_tf_serving.py
RUN python3 /tmp/patch_tf_serving.py /scann /tensorflow-serving

WORKDIR /tensorflow-serving
# ScaNN's kernels are built for AVX2 + FMA (as the google/tf-serving-scann images were): the
# image needs an x86-64 CPU from 2013 or later. TF Serving 2.20 compiles with its hermetic clang
# 18.1.8 (rules_ml_toolchain); ScaNN 1.4.2 documents clang 19 with -fsized-deallocation (on by
# default only from clang 19) and -w, so ScaNN's files get those two flags.
ARG TF_SERVING_BUILD_OPTIONS="--config=release --copt=-mavx2 --copt=-mfma --cxxopt=-std=c++17 \
    --per_file_copt=external/com_google_scann/.*@-fsized-deallocation,-w"
ARG TF_SERVING_BAZEL_OPTIONS=""
# The grep fails the build when ScaNN's ops did not make it into the binary (alwayslink lost).
RUN bazel build --color=yes --curses=no --verbose_failures \
        ${TF_SERVING_BAZEL_OPTIONS} ${TF_SERVING_BUILD_OPTIONS} \
        tensorflow_serving/model_servers:tensorflow_model_server && \
    grep -q "Scann>TensorsToScann" \
        bazel-bin/tensorflow_serving/model_servers/tensorflow_model_server && \
    cp bazel-bin/tensorflow_serving/model_servers/tensorflow_model_server \
       /usr/local/bin/tensorflow_model_server && \
    bazel clean --expunge

# ---------------------------------------------------------------------------------------------
# Stage 2 (`--target stock`): the official image; serves the partitioned exports (<name>_part,
# approximate top-k at ANN speed), the brute-force ones (<name>_bf) and the item encoder, which
# use TensorFlow's own ops only: models.stock.config is models.config without the ScaNN models.
FROM ${TF_SERVING_RUNTIME_IMAGE} AS stock

COPY export/ /models/
COPY serving/batching.config /config/batching.config
COPY serving/monitoring.config /config/monitoring.config

EXPOSE 8500 8501
ENTRYPOINT ["/usr/bin/tensorflow_model_server", "--port=8500", "--rest_api_port=8501", \
            "--model_config_file=/models/models.stock.config", \
            "--model_config_file_poll_wait_seconds=10", \
            "--enable_batching=true", "--batching_parameters_file=/config/batching.config", \
            "--monitoring_config_file=/config/monitoring.config", \
            "--enable_model_warmup=true"]

# ---------------------------------------------------------------------------------------------
# Stage 3 (default, last): the official runtime image with its model server replaced by the
# ScaNN-enabled build of stage 1 (same TF Serving version and build image, so the same system
# libraries); serves ScaNN and brute-force exports alike.
FROM ${TF_SERVING_RUNTIME_IMAGE} AS serving-scann

COPY --from=scann-build /usr/local/bin/tensorflow_model_server /usr/bin/tensorflow_model_server
COPY export/ /models/
COPY serving/batching.config /config/batching.config
COPY serving/monitoring.config /config/monitoring.config

EXPOSE 8500 8501
ENTRYPOINT ["/usr/bin/tensorflow_model_server", "--port=8500", "--rest_api_port=8501", \
            "--model_config_file=/models/models.config", \
            "--model_config_file_poll_wait_seconds=10", \
            "--enable_batching=true", "--batching_parameters_file=/config/batching.config", \
            "--monitoring_config_file=/config/monitoring.config", \
            "--enable_model_warmup=true"]
