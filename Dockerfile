# syntax=docker/dockerfile:1
# One image, two entry points: `pd-sidecar` (decode pods) and `epp` (the endpoint
# picker); pick one with the container's command. The builder stage makes wheels of
# the project and all its dependencies and installs them into a virtual environment;
# the final stage is a clean slim Python with only that environment, run as non-root.
#
# tests/deploy/test_dockerfile.py replays the builder stage in a fresh virtual
# environment: keep every path in RUN lines behind the ENV variables below.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SRC=/src \
    WHEELS=/wheels \
    VENV=/opt/disagg
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY sidecar ./sidecar
COPY epp ./epp
COPY vllm_sim ./vllm_sim
# Binary wheels only for the dependencies: the slim base has no compiler, and a
# dependency that would need one should fail the build here, not at run time.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --only-binary=:all: --wheel-dir "$WHEELS" "$SRC"
# The environment gets no pip of its own: the image never installs at run time.
RUN python -m venv --without-pip "$VENV" \
    && python -m pip --python "$VENV/bin/python" install --no-index \
        --find-links "$WHEELS" disagg

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="disagg" \
      org.opencontainers.image.description="pd-sidecar and EPP for prefill/decode disaggregation of vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VENV=/opt/disagg \
    PATH=/opt/disagg/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=builder /opt/disagg /opt/disagg
# The manifests run with readOnlyRootFilesystem; the byte code was compiled at install.
USER 65532:65532
# pd-sidecar: 8000 (proxy), 9400 (metrics). epp: 9002 (ext_proc), 9003 (health), 9090 (metrics).
EXPOSE 8000 9400 9002 9003 9090
CMD ["pd-sidecar", "--help"]
