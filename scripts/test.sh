#!/usr/bin/env bash
# The one command that runs every test from a fresh machine: it brings up what the tests
# need (PostgreSQL on 127.0.0.1:5432, the Hugging Face client in .venv, Chromium with
# playwright-core), then runs formatting, lint and the whole test suite.
# .ci/run calls exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    log "PostgreSQL is answering on 127.0.0.1:5432"
    return
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing PostgreSQL from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 120); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.5 # readiness poll
  done
  pg_isready -h 127.0.0.1 -p 5432
  # Tests connect as postgres without a password (the machine's trust setup); make sure
  # that role can create databases.
  su postgres -c "psql -qtAc \"ALTER ROLE postgres CREATEDB\"" >/dev/null 2>&1 || true
}

# The official Hugging Face client, a real SMTP server (aiosmtpd) and an S3-protocol server
# (moto), pinned, in a
# virtualenv of the project's own.
ensure_venv() {
  local venv=.venv
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import huggingface_hub, aiosmtpd, moto, sys; sys.exit(huggingface_hub.__version__ != "2.4.0" or aiosmtpd.__version__ != "1.4.6" or moto.__version__ != "5.2.5")' 2>/dev/null; then
    log "huggingface-hub 2.4.0, aiosmtpd 1.4.6 and moto 5.2.5 are in $venv"
  else
    log "installing huggingface-hub, aiosmtpd and moto[server] into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "huggingface-hub==2.4.0" "aiosmtpd==1.4.6" "moto[server]==5.2.5"
  fi
  export WEIGHTGATE_TEST_VENV="$PWD/$venv"
}

# Debian's Chromium and playwright-core (npm) for the browser tests.
ensure_browser() {
  if ! [ -x /usr/bin/chromium ]; then
    log "installing Chromium from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  fi
  if ! [ -d tests/browser/node_modules/playwright-core ]; then
    log "installing playwright-core into tests/browser"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

ensure_postgres
ensure_venv
ensure_browser
export WEIGHTGATE_TEST_PG="${WEIGHTGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}"

log "cargo fmt --check"
cargo fmt --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
cargo test --locked --all-targets --no-fail-fast
