# cattle node image: locked dependencies, no build tools, non-root, one process.
#   docker build -t cattle .
#   docker run -p 8000:8000 -e CATTLE_HOST=0.0.0.0 cattle
# In production, set CATTLE_ENVIRONMENT=production, CATTLE_DATABASE_URL and
# CATTLE_CURSOR_SECRET, and run `python -m service migrate` once (a Job) first.

FROM python:3.11-slim-bookworm AS build
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv
WORKDIR /app
# Dependencies first, from the lock only, so code changes reuse this layer.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY service ./service

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin cattle
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/service /app/service
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    CATTLE_DATA_DIR=/app/var
RUN mkdir -p /app/var && chown cattle /app/var
USER cattle
EXPOSE 8000
# Exec form: SIGTERM reaches the node itself, which drains before it exits.
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]
