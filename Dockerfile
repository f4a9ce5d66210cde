# The rareml API: 04_serve.py under gunicorn, with the model folder copied in (or mounted over
# /app/artifacts/model). Build after `make all`:  docker build -t rareml-api .
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# PIP_CERT: a CA bundle mounted into the build, for networks that inspect TLS (see .ci/container.sh)
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/requirements-serve.txt \
 && find /opt/venv -name "__pycache__" -prune -exec rm -rf {} + \
 && find /opt/venv -path "*/tests/*" -name "*.py" -delete

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="rareml-api" \
      org.opencontainers.image.description="Calibrated rare-event classifier served by gunicorn, with Prometheus metrics"
RUN useradd --system --create-home --uid 10001 rareml \
 && mkdir -p /data /tmp/rareml-metrics \
 && chown rareml /data /tmp/rareml-metrics
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY rareml/ rareml/
COPY 04_serve.py ./
COPY artifacts/model/ artifacts/model/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/rareml-metrics
USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# SIGTERM (docker stop, a rolling update): /ready turns 503 for --drain seconds (5) while requests are
# still answered, then what was accepted is finished; give `docker stop -t` more than that (compose: 40 s).
# Slow clients cannot hold the workers (rareml/server.py reads each request whole first): no proxy needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "04_serve.py", "--artifacts", "/app/artifacts", "--db", "/data/predictions.db", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--workers", "2"]
