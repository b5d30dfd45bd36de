#!/usr/bin/env bash
# Starts the local PostgreSQL cluster (whatever version is installed) and makes sure the
# `medbridge` role exists, so tests can reach it at MEDBRIDGE_TEST_PG_URL's default.
set -euo pipefail
version=$(ls /etc/postgresql | sort -V | tail -1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 && break
  sleep 0.2
done
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sh -c "$1"; fi; }
as_postgres "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='medbridge'\"" | grep -q 1 || \
  as_postgres "psql -qc \"CREATE ROLE medbridge LOGIN CREATEDB PASSWORD 'medbridge'\""
