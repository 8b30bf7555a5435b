# ftstudy on a GPU cluster: the project installed on a CUDA base image; the entrypoint is a Prefect worker.
#
#   docker build -t ftstudy:latest .                                      # CUDA 12.8, PyTorch's cu128 wheels
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t ftstudy:cu126 .
#
# The same image serves the worker (ENTRYPOINT, `--pool ...` as its command) and the arm's job pods,
# whose command the work pool's job template sets (`prefect flow-run execute`). The deployments run
# the flows of the installed package (from its site-packages directory). See docs/cluster.md.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0

# DL3064 reads the "TOKEN" in TOKENIZERS_PARALLELISM as a secret; nothing here is one.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    PREFECT_LOGGING_EXTRA_LOGGERS=ftcore \
    TOKENIZERS_PARALLELISM=false

# The base image is a build argument, so its package versions are not pinned here (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the index that matches the base image's CUDA; then the project (its range accepts it).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/ftstudy
COPY pyproject.toml README.md ./
COPY ftcore ./ftcore
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
# The project itself, whose dependency ranges are in pyproject.toml (DL3013).
# hadolint ignore=DL3013
RUN pip install ".[kubernetes]"

# Not root: the worker and its job pods run as an unprivileged user; /cache and /artifacts are mounts.
RUN useradd --create-home --uid 1000 ftstudy && mkdir -p /cache /artifacts && chown ftstudy /cache /artifacts
USER 1000

ENTRYPOINT ["prefect", "worker", "start"]
CMD ["--pool", "ftstudy-gpu", "--type", "kubernetes"]
