#!/usr/bin/env bash
# Provides a PostgreSQL server for the scale-out tests and exports
# ORDERVAULT_TEST_POSTGRES_URL naming a fresh database for this run.
# Sourced by .ci/run. Uses the server on 127.0.0.1:5432 if one answers;
# otherwise starts one, installing Debian's `postgresql` if it is absent.
# Fails (does not skip) when it still cannot reach one.

PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else as_root su postgres -s /bin/bash -c "$(printf '%q ' "$@")"; fi
}

pg_up() {
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null
}

start_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "   installing Debian's postgresql"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version cluster
    if pg_lsclusters -h 2>/dev/null | grep -q .; then
        read -r version cluster _ < <(pg_lsclusters -h | head -1)
        echo "   starting cluster $version/$cluster"
        as_root pg_ctlcluster "$version" "$cluster" start || true
    else
        version=$(ls /usr/lib/postgresql | sort -V | tail -1)
        echo "   creating cluster $version/main"
        as_root pg_createcluster "$version" main --start -- --auth-local=peer --auth-host=scram-sha-256
    fi
    for _ in $(seq 1 30); do
        pg_up && return 0
        sleep 1
    done
    return 1
}

if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    echo "   installing Debian's postgresql-client"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi

if ! pg_up; then
    start_postgres || { echo "FAIL: no PostgreSQL on $PG_HOST:$PG_PORT and none could be started" >&2; exit 1; }
fi

# The URL must carry everything the tests need (they do not read PGPASSWORD):
# trust authentication as on the development machine, else PGPASSWORD if
# given, else a role of this script's own with a password set for this run
# through the local socket (the postgres superuser is left as it is).
can_login() {
    env -u PGPASSWORD psql "$1" -qAtc 'SELECT 1' >/dev/null 2>&1
}
ADMIN_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/postgres"
if ! can_login "$ADMIN_URL" && [ -n "${PGPASSWORD:-}" ]; then
    ADMIN_URL="postgres://$PG_USER:$PGPASSWORD@$PG_HOST:$PG_PORT/postgres"
fi
if ! can_login "$ADMIN_URL"; then
    password="ci$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
    as_postgres psql -qc "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ordervault_ci') THEN
            CREATE ROLE ordervault_ci LOGIN CREATEDB;
        END IF;
    END \$\$; ALTER ROLE ordervault_ci PASSWORD '$password'" >/dev/null \
        || { echo "FAIL: cannot log in to PostgreSQL on $PG_HOST:$PG_PORT, nor create a role for the tests" >&2; exit 1; }
    ADMIN_URL="postgres://ordervault_ci:$password@$PG_HOST:$PG_PORT/postgres"
    can_login "$ADMIN_URL" || { echo "FAIL: cannot log in to PostgreSQL on $PG_HOST:$PG_PORT" >&2; exit 1; }
fi

CI_DB="ordervault_ci_$$"
psql "$ADMIN_URL" -qc "CREATE DATABASE $CI_DB" >/dev/null || { echo "FAIL: cannot create database $CI_DB" >&2; exit 1; }
export ORDERVAULT_TEST_POSTGRES_URL="${ADMIN_URL%/postgres}/$CI_DB"
CI_ADMIN_URL="$ADMIN_URL"
drop_ci_database() {
    psql "$CI_ADMIN_URL" -qc "DROP DATABASE IF EXISTS $CI_DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap drop_ci_database EXIT
echo "   PostgreSQL $(psql "$ADMIN_URL" -qAtc 'SHOW server_version') on $PG_HOST:$PG_PORT, database $CI_DB"
