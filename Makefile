# Two commands: `make run` and `make test`. Both create .venv and install the project first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: run test deps lint typecheck bench clean

# Programs from Debian's packages, as CHECK:PACKAGE (see the script): a real PostgreSQL for the
# tests (server binaries, psql, pgbench), a real MariaDB (mariadbd, mariadb-install-db and the
# auth_ed25519 plugin from mariadb-server; the mariadb CLI and mysqlslap from mariadb-client;
# tests/mysqlserver.py runs its own, the packaged service is stopped after install), openssl
# (test certificates), dig (DNS tests) and prometheus (the end-to-end metrics test runs its own
# on a free port).
# Installed when missing and we are root; otherwise the script says what is missing and the
# tests needing it skip.
DEBIAN_DEPS := '/usr/lib/postgresql/*/bin/initdb:postgresql' '/usr/lib/postgresql/*/bin/postgres:postgresql' \
	psql:postgresql-client pgbench:postgresql-client \
	/usr/sbin/mariadbd:mariadb-server /usr/bin/mariadb-install-db:mariadb-server \
	mariadb:mariadb-client mysqlslap:mariadb-client \
	openssl:openssl dig:bind9-dnsutils prometheus:prometheus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

deps:
	bash scripts/ensure-debian-packages.sh $(DEBIAN_DEPS)
	bash scripts/ensure-docker.sh

run: $(STAMP) deps
	$(BIN)/pointsman up --config $(CONFIG)

test: $(STAMP) deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	bash bench/http.sh
	bash bench/tcp.sh
	bash bench/pg.sh
	bash bench/mysql.sh
	bash bench/dns.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
