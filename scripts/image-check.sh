#!/usr/bin/env bash
# make image-check: the image assembly of `make images`, checked on the debug binaries that
# `make unit` built: each OCI archive is well-formed (digests, config, non-root user), and the
# binary runs with only the libraries and loader packed into its root filesystem.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for bin in kiln-operator kiln-model-server; do
  python3 "$ROOT/scripts/image.py" "$BIN_DIR/$bin" "$bin" check "$out" >"$out/$bin.json"
  python3 - "$out/$bin.json" "$bin" <<'PY'
import hashlib, json, sys, tarfile
info, name = json.load(open(sys.argv[1])), sys.argv[2]
tar = tarfile.open(info['archive'])
read = lambda p: tar.extractfile(p).read()
def check(desc):
    data = read('blobs/sha256/' + desc['digest'].split(':')[1])
    assert hashlib.sha256(data).hexdigest() == desc['digest'].split(':')[1] and len(data) == desc['size'], desc
    return data
assert json.loads(read('oci-layout'))['imageLayoutVersion'] == '1.0.0'
manifest = json.loads(check(json.loads(read('index.json'))['manifests'][0]))
config = json.loads(check(manifest['config']))
check(manifest['layers'][0])
assert config['config']['User'] == '65532:65532', config
assert config['config']['Entrypoint'] == [f'/usr/local/bin/{name}'], config
assert f'/usr/local/bin/{name}' in info['files'] and '/etc/passwd' in info['files'], info['files']
print(f"{name}: OCI archive ok, {info['compressed_bytes'] / 2**20:.1f} MiB compressed, "
      f"{len(info['files'])} files, user {config['config']['User']}")
PY
  rootfs="$out/$bin-rootfs"
  loader="$(cd "$rootfs" && find . -name "ld-linux*.so.*" | head -n1)"
  libdirs="$(cd "$rootfs" && find . -name '*.so*' -printf '%h\n' | sort -u | sed "s|^\.|$rootfs|" | paste -sd:)"
  version="$("$rootfs/$loader" --library-path "$libdirs" "$rootfs/usr/local/bin/$bin" --version)"
  echo "$bin: runs from its root filesystem alone: $version"
done
