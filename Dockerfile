# The proxy as a container: slim Python, non-root, config mounted at /config/config.toml.
# The store is a SQLite file in the volume /app/data unless the config's [storage] url names
# a PostgreSQL (compose.yaml); asyncpg, its driver, is a dependency like the others.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && useradd --create-home --uid 10001 proxy && mkdir -p /app/data && chown proxy /app/data
USER proxy
VOLUME /app/data

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2); sys.exit(0)"
# The config's [server] must listen on 0.0.0.0 port 8080 inside the container; --host/--port force it.
CMD ["proxy", "serve", "--config", "/config/config.toml", "--host", "0.0.0.0", "--port", "8080"]
