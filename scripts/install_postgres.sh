#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this machine: the
# registry tests start a throw-away server of their own with them (tests/support/postgres.py).
#
# Found on PATH or in Debian's /usr/lib/postgresql/<major>/bin: nothing to do. Otherwise install
# Debian's `postgresql` package with apt-get (root, or through sudo), without letting the package
# create and start a cluster of its own (the tests never use one). No server is left running.
set -euo pipefail

log() { echo "install_postgres: $*" >&2; }

have_binaries() {
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        return 0
    fi
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" && -x "$dir/postgres" ]] && return 0
    done
    return 1
}

if have_binaries; then
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    log "PostgreSQL server binaries not found and no apt-get here: install PostgreSQL (initdb," \
        "pg_ctl, postgres) with your system's package manager, then re-run."
    exit 1
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null; then
        log "installing Debian's postgresql package needs root (or sudo)."
        exit 1
    fi
    sudo=(sudo)
fi

log "installing Debian's postgresql package (server binaries for the tests)"
# Do not let the package create (and start) a 'main' cluster: the tests start their own server.
"${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" |
    "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/fedpersona-tests.conf >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql >/dev/null

have_binaries || { log "postgresql installed but initdb/pg_ctl still not found"; exit 1; }
