# cattle node image: locked dependencies, no build tools and no uv in the
# final stage, a numeric non-root user, one process started in exec form.
#
#   docker build -t cattle .
#   docker run -p 8000:8000 -e CATTLE_HOST=0.0.0.0 cattle
#   docker run --rm -e CATTLE_DATABASE_URL=... cattle migrate
#
# BASE_IMAGE must put python3 at the same path in both stages (the venv links
# to it); the default is the official image. tests/ship/ builds this file with
# buildah over a Debian base made by debootstrap, passed as BASE_IMAGE.
# docs/deploy.md has the rest (production settings, the migration Job).

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_DEV=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies first, from the lock alone (--locked: a lock that no longer
# matches pyproject.toml fails the build), so a code change reuses this layer.
# A build behind a TLS-intercepting proxy passes its CA bundle as the secret
# `ca` (docker build --secret id=ca,src=...); it never reaches the image.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=/app/pyproject.toml \
    --mount=type=bind,source=uv.lock,target=/app/uv.lock \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi \
    && uv sync --locked --no-dev --no-install-project
# The service runs from its source tree (pyproject: package = false), so the
# project step is the sources: service/ holds the code and every migration.
COPY service /app/service

FROM ${BASE_IMAGE}
# A fixed numeric user, created before anything is copied for it, so
# Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 cattle \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin cattle \
    && mkdir -p /app/var \
    && chown 10001:10001 /app/var
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/service /app/service
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CATTLE_HOST=0.0.0.0 \
    CATTLE_PORT=8000 \
    CATTLE_DATA_DIR=/app/var
USER 10001:10001
EXPOSE 8000
# Exec form, no shell and no `uv run`: the node is PID 1 and gets SIGTERM
# itself, drains, and exits 0 (docs/operations.md, the drain sequence).
ENTRYPOINT ["python3", "-m", "service"]
CMD ["serve"]
