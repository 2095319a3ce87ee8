#!/usr/bin/env bash
# PostgreSQL for the test suite's own throwaway server (tests/postgres.py): the Debian package, installed once.
# Does nothing where initdb is already on PATH or under /usr/lib/postgresql; elsewhere without root/apt it
# says so and the PostgreSQL tests skip with that reason.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # a failed install (no network, a held package) must not stop the test command: the tests then skip
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; then
        echo "installed PostgreSQL: $(ls /usr/lib/postgresql)"
    else
        echo "apt-get could not install PostgreSQL; the PostgreSQL tests skip" >&2
    fi
else
    echo "PostgreSQL is not installed and this is no root Debian machine: install it (e.g. apt-get install" \
         "postgresql); until then the PostgreSQL tests skip" >&2
fi
