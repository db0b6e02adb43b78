# myshop-ops: the worker and the operator CLI in one image.
#
#   docker build -t myshop-ops .
#   docker run --rm --env-file /etc/myshop/myshop.env myshop-ops                 # a worker (metrics on :9300)
#   docker run --rm --env-file /etc/myshop/myshop.env myshop-ops stats           # any other command
#   docker compose up -d                                                           # the whole stack, 3 workers
#
# Settings come from the environment (SPEC section 1, .env.example); no .env is baked into the image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 myshop \
 && useradd --system --uid 10001 --gid myshop --home-dir /app --no-create-home --shell /usr/sbin/nologin myshop

WORKDIR /app
# pyproject.toml names README.md as the readme: both are needed to build the package
COPY pyproject.toml README.md ./
COPY myshop_ops ./myshop_ops
# no .git in the image's context: the release's version comes in as a build argument (`docker compose build
# --build-arg MYSHOP_VERSION=$(.venv/bin/python -m setuptools_scm)`), else it says unknown
ARG MYSHOP_VERSION=0.0.0+unknown
RUN SETUPTOOLS_SCM_PRETEND_VERSION="$MYSHOP_VERSION" pip install . && rm -rf build *.egg-info

USER myshop:myshop

# Worker metrics, /healthz and /readyz. Inside a container every worker uses 9300 (one network namespace
# each); on a host, systemd and supervisor give instance N the port 9300+N. The port binds 127.0.0.1 unless told:
# in a container it must bind every interface of the container's own namespace for a scraper to reach it (what
# reaches the host is decided by -p / ports:, publish it to a trusted network only).
ENV MYSHOP_METRICS_HOST=0.0.0.0
EXPOSE 9300
# Liveness: the consume loop turned in the last 60 s (not readiness: a worker waiting out a RabbitMQ or
# MongoDB outage is alive, and restarting it would not help). Needs --metrics-port 9300, as in CMD.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9300/healthz', timeout=4)"]

# SIGTERM: the worker finishes and acks its current batch, then exits 0. Give it time to:
# `docker stop -t 150`, or stop_grace_period: 150s in compose (Docker's default is 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["myshop"]
CMD ["consume", "--metrics-port", "9300", "--memory-limit", "512M"]
