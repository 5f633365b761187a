#!/usr/bin/env bash
# Start the Debian PostgreSQL cluster and create the qlsearch role and database (idempotent).
set -euo pipefail
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start 2>/dev/null || pg_ctlcluster "$version" main status >/dev/null
su postgres -c "psql -qc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='qlsearch') THEN CREATE ROLE qlsearch LOGIN PASSWORD 'qlsearch'; END IF; END\\\$\\\$;\""
su postgres -c "psql -qtc \"SELECT 1 FROM pg_database WHERE datname='qlsearch'\" | grep -q 1 || createdb -O qlsearch qlsearch"
