# The worker image: a Ray node that builds and scores candidates on its GPU(s) (torch + CUDA,
# transformers, lm-eval) and writes exports. It runs `ray start --address=<head> --block`.
#
#   docker build -f docker/worker.Dockerfile -t evomerge-worker .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_SPEC="torch==2.5.1" \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t evomerge-worker .
#
# torch's Linux wheels bring their own CUDA libraries (the nvidia-* wheels); the host needs the
# NVIDIA driver and the NVIDIA Container Toolkit, nothing else. The Python base is the same as
# the API image's on purpose: Ray drivers and workers must run the same Python and Ray versions.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0
# torch first and pinned, like the Makefile's TORCH_SPEC; an empty TORCH_INDEX_URL means the
# default index, whose Linux x86_64 torch wheels are CUDA builds.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The same uid as the API image: exports written here are served from the same /data there.
RUN useradd --create-home --uid 1000 evomerge \
 && mkdir -p /data /models /hf-cache /ray-auth \
 && chown evomerge:evomerge /data /hf-cache /ray-auth

# torch in its own layer: it is the big one, and it changes less often than the code.
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else pip install "$TORCH_SPEC"; fi \
 && pip freeze | grep -i '^torch==' > /etc/torch-constraint.txt

COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
COPY workers /tmp/src/workers
COPY search_spaces /tmp/src/search_spaces
COPY evaluators /tmp/src/evaluators
COPY migrations /tmp/src/migrations

# Everything a worker needs (the `worker` extra), keeping the torch installed above.
RUN pip install -c /etc/torch-constraint.txt "ray[default]==${RAY_VERSION}" "/tmp/src[worker]" \
 && rm -rf /tmp/src \
 && python -c "import torch, ray, workers.candidate, evaluators.runtime.fast_lm; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'ray', ray.__version__)"

ENV EVOMERGE_DATA_DIR=/data \
    HF_HOME=/hf-cache

USER evomerge
WORKDIR /home/evomerge
CMD ["ray", "start", "--address=ray-head:6379", "--block"]
