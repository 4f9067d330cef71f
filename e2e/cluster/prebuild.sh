#!/usr/bin/env bash
# `make test` builds the Go side of the e2e suite (control plane, kwok, prometheus-adapter) in
# the background while cargo compiles. The Go builds run at nice 15, so they take only the CPU
# that cargo leaves idle (downloads, single-crate tails, linking); on a cold 2-core machine that
# hides most of their 20 minutes. Warm, both build scripts return at once.
#
#   prebuild.sh start   start the builds in the background and return
#   prebuild.sh wait    wait for them; on failure print the log's tail and exit 1
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KILN_CACHE="${KILN_CACHE:-${HOME}/.cache/kiln}"
DIR="${KILN_CACHE}/prebuild"
LOG="${DIR}/log"

case "${1:-}" in
  start)
    mkdir -p "${DIR}"
    rm -f "${DIR}/rc"
    # The subshell outlives this script; its exit status lands in rc for `wait`.
    (
      set +e
      {
        bash "${SCRIPT_DIR}/build-control-plane.sh" && bash "${SCRIPT_DIR}/build-monitoring.sh" >/dev/null
      } >"${LOG}" 2>&1 </dev/null
      echo $? >"${DIR}/rc.partial" && mv "${DIR}/rc.partial" "${DIR}/rc"
    ) &
    echo $! >"${DIR}/pid"
    echo "prebuild: control plane and monitoring build in the background (log: ${LOG})"
    ;;
  wait)
    [[ -f "${DIR}/pid" ]] || { echo "prebuild: nothing started (run '$0 start')" >&2; exit 1; }
    pid="$(cat "${DIR}/pid")"
    waited=0
    while [[ ! -f "${DIR}/rc" ]]; do
      if ! kill -0 "${pid}" 2>/dev/null && [[ ! -f "${DIR}/rc" ]]; then
        echo "prebuild: the background build (pid ${pid}) ended without a result; log: ${LOG}" >&2
        exit 1
      fi
      if (( waited % 60 == 0 )); then echo "prebuild: waiting for the Go builds ($(tail -n1 "${LOG}" 2>/dev/null))"; fi
      sleep 2
      waited=$((waited + 2))
    done
    rc="$(cat "${DIR}/rc")"
    if [[ "${rc}" != 0 ]]; then
      echo "prebuild: the control plane or monitoring build failed (exit ${rc}); last lines of ${LOG}:" >&2
      tail -n 30 "${LOG}" >&2
      exit 1
    fi
    echo "prebuild: control plane and monitoring ready"
    ;;
  *)
    echo "usage: $0 start|wait" >&2
    exit 2
    ;;
esac
