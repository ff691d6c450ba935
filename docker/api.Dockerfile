# The API image: REST API, dashboard, study controller, `evomerge migrate` / `token`, and the
# Ray head of docker-compose.yml. No torch: the controller only proposes recipes and
# dispatches them to Ray workers (docker/worker.Dockerfile), which build and score the models.
#
#   docker build -f docker/api.Dockerfile -t evomerge-api .
#
# Ray drivers and workers must run the same Ray and Python versions: build both images with
# the same RAY_VERSION and PYTHON_VERSION (docker-compose.yml passes the same values to both).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# One unprivileged user, the same uid as in the worker image: both write the shared /data. A new
# named volume takes its mount point's owner from the image: /ray-auth is where the one-shot
# `ray-token` service of docker-compose.yml writes the Ray token (private to this uid).
RUN useradd --create-home --uid 1000 evomerge \
 && mkdir -p /data /models /hf-cache /ray-auth \
 && chown evomerge:evomerge /data /hf-cache /ray-auth

COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
COPY workers /tmp/src/workers
COPY search_spaces /tmp/src/search_spaces
COPY evaluators /tmp/src/evaluators
COPY migrations /tmp/src/migrations

# The base install (no `worker` extra): no torch, transformers or accelerate. ray[default]
# adds the Ray dashboard (served by the head on :8265).
RUN pip install "ray[default]==${RAY_VERSION}" /tmp/src \
 && rm -rf /tmp/src \
 && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'transformers', 'accelerate') if u.find_spec(m)]; sys.exit(f'the API image must not contain {bad}' if bad else 0)" \
 && python -c "import sys, service.app, service.controller, service.export_runner; assert 'torch' not in sys.modules"

ENV EVOMERGE_DATA_DIR=/data \
    HF_HOME=/hf-cache

USER evomerge
WORKDIR /home/evomerge
EXPOSE 8765
CMD ["evomerge", "serve"]
