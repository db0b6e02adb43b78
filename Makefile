# Two commands on a fresh machine:  `make demo` (the pipeline end to end)  and  `make test` (the suite).
PYTHON ?= python3
PY313 ?= $(shell ls -d $$(pyenv root 2>/dev/null || echo /root/.pyenv)/versions/3.13*/bin/python 2>/dev/null | tail -n1)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv services demo test check soak bench lint mutations stop-services clean debian-tools release

$(BIN)/myshop: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $@

.venv-mongo/bin/python:
	@test -n "$(PY313)" || { echo "Python 3.13 not found (pyenv install 3.13); the Mongo-wire server needs it" >&2; exit 2; }
	$(PY313) -m venv .venv-mongo
	.venv-mongo/bin/pip install -q 'mongoeco[wire]==4.11.0'

venv: $(BIN)/myshop .venv-mongo/bin/python

services: venv
	@tools/services.sh

demo: services
	@MYSHOP_ALLOW_ROOT=$${MYSHOP_ALLOW_ROOT:-$$( [ "$$(id -u)" = 0 ] && echo 1 )} $(BIN)/python tools/demo.py

# the release: a wheel (what CHECKLIST.md step 1 installs) and an sdist (the units, supervisor/, examples/, docs) in
# dist/, versioned from git by setuptools-scm (`git describe`); run it in a git checkout of the commit to release
release: $(BIN)/myshop
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	@ls dist

# promtool (checks monitoring/alerts.yml), docker-compose v1 (checks docker-compose.yml without a daemon), and the
# shop's own PHP side: Symfony Messenger's AMQP transport and the MongoDB driver (tests/shop drives them for real)
DEBIAN_TOOLS := prometheus docker-compose php-cli php-amqp php-mongodb php-symfony-messenger \
  php-symfony-amqp-messenger php-symfony-serializer php-symfony-property-access php-symfony-property-info \
  php-symfony-event-dispatcher
debian-tools:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null && \
	  php -m 2>/dev/null | grep -qx amqp && php -m | grep -qx mongodb && \
	  test -f /usr/share/php/Symfony/Component/Messenger/Bridge/Amqp/autoload.php && \
	  test -f /usr/share/php/Symfony/Component/EventDispatcher/autoload.php || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { \
	    echo "installing from Debian: $(DEBIAN_TOOLS)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null; }; \
	  } || echo "promtool/docker-compose/php missing: their checks are skipped" >&2; }

test: venv debian-tools
	@tools/services.sh >/dev/null
	$(BIN)/pytest -q -n 3 --dist loadfile  # three processes, whole files each: see tests/support/services.py redis_url

# the edit-test loop, no service needed (well under a minute): lint, the contract, the unit and stand-in tests
check: $(BIN)/myshop
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 -p no:cacheprovider -m "not services" tests/unit tests/contract

# the reliability suite at soak sizes (>= 20 kills, >= 10,000 malformed bodies) and every cluster scenario (tests/cluster:
# a private 3-node RabbitMQ cluster, tools/cluster.sh; none of it in `make test`); figures in
# .run/reliability-soak.jsonl
soak: venv
	@tools/services.sh >/dev/null
	SOAK=1 RELIABILITY_REPORT=.run/reliability-soak.jsonl $(BIN)/pytest -q -m "reliability or cluster" -p no:cacheprovider

# every benchmark with its baseline and ratio (docs/PERFORMANCE.md)
bench: venv
	@tools/services.sh >/dev/null
	MYSHOP_ALLOW_ROOT=1 $(BIN)/python benchmarks/run.py

# break the worker core one decision at a time (a copy in a temp dir); its stand-in tests must fail for each
mutations: venv
	$(BIN)/python tools/core_mutations.py

lint: venv
	$(BIN)/ruff check .

stop-services:
	@test -f .run/mongo-wire.pid && kill $$(cat .run/mongo-wire.pid) && rm .run/mongo-wire.pid || true

clean: stop-services
	rm -rf $(VENV) .venv-mongo .run dist build
