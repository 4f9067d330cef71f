#!/usr/bin/env bash
# Build or fetch the monitoring stack the autoscaling e2e test runs, cached by version:
#   $KILN_CACHE/prometheus-<PROMETHEUS_DEB_VERSION>/bin/prometheus     (Debian's package, unpacked)
#   $KILN_CACHE/prometheus-adapter-<ADAPTER_VERSION>/bin/adapter       (go build in its own module)
#
# Why Debian's Prometheus: `go install github.com/prometheus/prometheus/cmd/prometheus@...` is
# refused (its go.mod carries exclude/replace lines) and its UI assets do not build from the
# module zip. The package is unpacked with dpkg-deb, so nothing is installed system-wide.
# prometheus-adapter has no replace lines, so it builds from its own module as published.
#
# Env:
#   PROMETHEUS_DEB_VERSION   the Debian package version to fetch (default: the candidate apt sees)
#   ADAPTER_VERSION          sigs.k8s.io/prometheus-adapter version (default v0.12.0)
#   KILN_CACHE               cache root (default ~/.cache/kiln)
#   NICE_LEVEL               niceness for the go build (default 15)
# Prints the two binary paths on its last two lines.
set -euo pipefail

ADAPTER_VERSION="${ADAPTER_VERSION:-v0.12.0}"
KILN_CACHE="${KILN_CACHE:-${HOME}/.cache/kiln}"
NICE_LEVEL="${NICE_LEVEL:-15}"

log() { printf '[build-monitoring %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[build-monitoring] error: %s\n' "$*" >&2; exit 1; }

# One build at a time (see build-control-plane.sh).
mkdir -p "${KILN_CACHE}"
exec 8>"${KILN_CACHE}/.build-monitoring.lock"
flock 8

# --- Prometheus -----------------------------------------------------------------------------
# A cached copy of any version satisfies a run that did not ask for one, so a warm machine
# never needs apt metadata.
prom_bin=""
if [[ -z "${PROMETHEUS_DEB_VERSION:-}" ]]; then
  for d in "${KILN_CACHE}"/prometheus-2*/; do
    [[ -f "${d}.complete" && -x "${d}bin/prometheus" ]] && prom_bin="${d}bin/prometheus"
  done
fi
if [[ -z "${prom_bin}" ]]; then
  command -v apt-get >/dev/null || die "apt-get not found: Prometheus comes from Debian's 'prometheus' package"
  if [[ -z "${PROMETHEUS_DEB_VERSION:-}" ]]; then
    PROMETHEUS_DEB_VERSION="$(apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
    if [[ -z "${PROMETHEUS_DEB_VERSION}" || "${PROMETHEUS_DEB_VERSION}" == "(none)" ]]; then
      log "refreshing apt package lists"
      apt-get update -qq >&2 || die "apt-get update failed (needs the Debian package registry)"
      PROMETHEUS_DEB_VERSION="$(apt-cache policy prometheus | sed -n 's/^ *Candidate: *//p')"
    fi
    [[ -n "${PROMETHEUS_DEB_VERSION}" && "${PROMETHEUS_DEB_VERSION}" != "(none)" ]] \
      || die "apt knows no 'prometheus' package"
  fi
  # The directory name keeps only the upstream part (2.42.0), which is what matters for flags.
  up="${PROMETHEUS_DEB_VERSION%%+*}"; up="${up%%-*}"
  dir="${KILN_CACHE}/prometheus-${up}"
  if [[ ! -f "${dir}/.complete" ]]; then
    log "fetching Debian's prometheus ${PROMETHEUS_DEB_VERSION}"
    rm -rf "${dir}"; mkdir -p "${dir}/deb" "${dir}/bin"
    (cd "${dir}/deb" && apt-get download -qq "prometheus=${PROMETHEUS_DEB_VERSION}" >&2) \
      || die "apt-get download prometheus=${PROMETHEUS_DEB_VERSION} failed"
    dpkg-deb -x "${dir}"/deb/prometheus_*.deb "${dir}/root"
    cp "${dir}/root/usr/bin/prometheus" "${dir}/bin/prometheus"
    rm -rf "${dir}/root" "${dir}/deb"
    "${dir}/bin/prometheus" --version >/dev/null 2>&1 || die "unpacked prometheus does not run"
    echo "${PROMETHEUS_DEB_VERSION}" > "${dir}/.complete"
  fi
  prom_bin="${dir}/bin/prometheus"
fi
log "prometheus: $("${prom_bin}" --version 2>&1 | head -1)"

# --- prometheus-adapter ---------------------------------------------------------------------
adir="${KILN_CACHE}/prometheus-adapter-${ADAPTER_VERSION}"
if [[ ! -f "${adir}/.complete" || ! -x "${adir}/bin/adapter" ]]; then
  log "building prometheus-adapter ${ADAPTER_VERSION} (go build, a few minutes cold)"
  t0=${SECONDS}
  rm -rf "${adir}"; mkdir -p "${adir}/bin"
  # Built inside the downloaded module with its own go.mod and go.sum. Not `go install
  # pkg@version`: the module is marked deprecated, and that command's deprecation check asks
  # the proxy for the module's version list, which the proxy here refuses.
  src="$(cd "${adir}" && GOFLAGS=-mod=mod go mod download -json \
    "sigs.k8s.io/prometheus-adapter@${ADAPTER_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -d "${src}/cmd/adapter" ]] || die "go mod download sigs.k8s.io/prometheus-adapter@${ADAPTER_VERSION} gave no source (dir '${src}')"
  (cd "${src}" && CGO_ENABLED=0 GO111MODULE=on GOFLAGS="-buildvcs=false -mod=readonly" \
    nice -n "${NICE_LEVEL}" go build -trimpath -ldflags "-s -w" -o "${adir}/bin/adapter" ./cmd/adapter >&2) \
    || die "building prometheus-adapter ${ADAPTER_VERSION} from ${src} failed"
  # --help exits non-zero (pflag), so look for a flag we use in what it prints.
  help="$("${adir}/bin/adapter" --help 2>&1 || true)"
  [[ "${help}" == *--prometheus-url* ]] || die "built adapter does not run"
  echo "${ADAPTER_VERSION}" > "${adir}/.complete"
  log "prometheus-adapter built in $((SECONDS - t0)) s"
fi

echo "${prom_bin}"
echo "${adir}/bin/adapter"
