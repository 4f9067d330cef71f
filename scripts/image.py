#!/usr/bin/env python3
"""Build a container image of one Kiln binary without pulling a base image.

usage: image.py BINARY NAME TAG OUT_DIR [--docker] [--cuda-libs=DIR]

1. Assembles a root filesystem holding only the binary, the shared libraries it links (from
   `ldd`, with the dynamic loader), the CA bundle (S3 and HTTPS sources), and /etc/passwd and
   /etc/group naming the non-root user 65532 the image runs as.
2. Writes OUT_DIR/NAME-TAG.oci.tar, an OCI image archive (`docker load -i`, `podman load -i`,
   `skopeo copy oci-archive:...`), reproducible: sorted entries, zero timestamps.
3. Writes that root filesystem to OUT_DIR/NAME-rootfs and, with --docker (a running daemon),
   `docker build`s images/<name>.Dockerfile as NAME:TAG with its `rootfs` stage replaced by
   that directory, so the build pulls no base image.

With --cuda-libs=DIR (the model server built with `make build-cuda`): the CUDA libraries it links
are taken from DIR into /usr/local/cuda/lib64 (with NVRTC's builtins, which it opens at run time),
except the driver's libcuda.so.1: the NVIDIA container runtime mounts that from the node.

Prints one JSON line: the archive, its size, the uncompressed root filesystem size and the files.
Standard library only.
"""
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

UID = 65532
CUDA_LIB_DIR = '/usr/local/cuda/lib64'
# Libraries of the node's NVIDIA driver: mounted into the container at run time, never shipped.
DRIVER_LIBS = ('libcuda.so.1',)
CA_BUNDLES = ['/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt']


def linked_libraries(binary, cuda_libs=None):
    env = dict(os.environ)
    if cuda_libs:
        env['LD_LIBRARY_PATH'] = cuda_libs
    out = subprocess.run(['ldd', binary], capture_output=True, text=True, env=env)
    if out.returncode != 0 and 'not a dynamic executable' in (out.stdout + out.stderr):
        return []  # static binary
    if out.returncode != 0:
        sys.exit(f'ldd {binary}: {out.stderr.strip()}')
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r'(?:=>\s*)?(/\S+)\s+\(0x', line)
        if m:
            libs.append(m.group(1))
        elif 'not found' in line and line.split()[0] in DRIVER_LIBS and cuda_libs:
            continue
        elif 'not found' in line:
            sys.exit(f'{binary}: a linked library is missing: {line.strip()}')
    return libs


def rootfs_files(binary, name, cuda_libs=None):
    """(path in image, source path or bytes, mode) for every file of the image."""
    files = [(f'/usr/local/bin/{name}', binary, 0o755)]
    for lib in linked_libraries(binary, cuda_libs):
        if cuda_libs and os.path.realpath(os.path.dirname(lib)) == os.path.realpath(cuda_libs):
            files.append((f'{CUDA_LIB_DIR}/{os.path.basename(lib)}', os.path.realpath(lib), 0o755))
        else:
            files.append((lib, os.path.realpath(lib), 0o755))
    if cuda_libs:
        # NVRTC compiles candle's kernels at run time and opens its builtins library by name.
        for extra in sorted(os.listdir(cuda_libs)):
            if extra.startswith('libnvrtc-builtins.so.'):
                files.append((f'{CUDA_LIB_DIR}/{extra}', os.path.join(cuda_libs, extra), 0o755))
    ca = next((p for p in CA_BUNDLES if os.path.exists(p)), None)
    if ca:
        files.append(('/etc/ssl/certs/ca-certificates.crt', ca, 0o644))
    files.append(('/etc/passwd', f'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{UID}:{UID}:nonroot:/home/nonroot:/sbin/nologin\n'.encode(), 0o644))
    files.append(('/etc/group', f'root:x:0:\nnonroot:x:{UID}:\n'.encode(), 0o644))
    return files


def layer_tar(files):
    """An uncompressed, reproducible tar of the files (parents included, /tmp writable)."""
    buf = io.BytesIO()
    dirs = {'tmp', 'home', 'home/nonroot'}
    for path, _, _ in files:
        parts = path.strip('/').split('/')[:-1]
        dirs.update('/'.join(parts[:i + 1]) for i in range(len(parts)))
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mtime = tarfile.DIRTYPE, 0
            info.mode = 0o1777 if d == 'tmp' else 0o755
            if d == 'home/nonroot':
                info.uid = info.gid = UID
            tar.addfile(info)
        for path, src, mode in sorted(files, key=lambda f: f[0]):
            data = src if isinstance(src, bytes) else open(src, 'rb').read()
            info = tarfile.TarInfo(path.strip('/'))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def blob(tar, data, media_type):
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f'blobs/sha256/{digest}')
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))
    return {'mediaType': media_type, 'digest': f'sha256:{digest}', 'size': len(data)}


def oci_archive(path, layer, name, tag, cuda=False):
    compressed = gzip.compress(layer, mtime=0)
    env = ['PATH=/usr/local/bin', 'SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt']
    if cuda:
        # Where the image's CUDA libraries are; which driver parts the NVIDIA runtime mounts.
        env += [f'LD_LIBRARY_PATH={CUDA_LIB_DIR}', 'NVIDIA_DRIVER_CAPABILITIES=compute,utility']
    config = {
        'architecture': {'x86_64': 'amd64', 'aarch64': 'arm64'}.get(os.uname().machine, os.uname().machine),
        'os': 'linux',
        'config': {'User': f'{UID}:{UID}', 'Entrypoint': [f'/usr/local/bin/{name}'],
                   'Env': env,
                   'WorkingDir': '/home/nonroot',
                   'Labels': {'org.opencontainers.image.title': name, 'org.opencontainers.image.version': tag}},
        'rootfs': {'type': 'layers', 'diff_ids': ['sha256:' + hashlib.sha256(layer).hexdigest()]},
        'history': [{'created_by': 'scripts/image.py: binary, linked libraries, CA bundle, passwd'}],
    }
    with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as tar:
        layer_desc = blob(tar, compressed, 'application/vnd.oci.image.layer.v1.tar+gzip')
        config_desc = blob(tar, json.dumps(config, sort_keys=True).encode(), 'application/vnd.oci.image.config.v1+json')
        manifest = {'schemaVersion': 2, 'mediaType': 'application/vnd.oci.image.manifest.v1+json',
                    'config': config_desc, 'layers': [layer_desc]}
        manifest_desc = blob(tar, json.dumps(manifest, sort_keys=True).encode(),
                             'application/vnd.oci.image.manifest.v1+json')
        manifest_desc['annotations'] = {'org.opencontainers.image.ref.name': tag,
                                        'io.containerd.image.name': f'{name}:{tag}'}
        for fname, content in (('oci-layout', {'imageLayoutVersion': '1.0.0'}),
                               ('index.json', {'schemaVersion': 2, 'manifests': [manifest_desc]})):
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(fname)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return len(compressed)


def write_rootfs(files, root):
    shutil.rmtree(root, ignore_errors=True)
    for path, src, mode in files:
        dest = os.path.join(root, path.strip('/'))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, 'wb') as f:
            f.write(src if isinstance(src, bytes) else open(src, 'rb').read())
        os.chmod(dest, mode)
    for d, mode in (('tmp', 0o1777), ('home/nonroot', 0o755)):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        os.chmod(os.path.join(root, d), mode)


def docker_build(root, dockerfile, name, tag, repo):
    """The Dockerfile's `rootfs` stage replaced by the assembled directory: nothing is pulled."""
    subprocess.run(['docker', 'build', '--build-context', f'rootfs={root}', '-f', dockerfile,
                    '-t', f'{name}:{tag}', repo], check=True)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    cuda_libs = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--cuda-libs=')), None)
    if cuda_libs and not os.path.isdir(cuda_libs):
        sys.exit(f'--cuda-libs={cuda_libs}: not a directory (make build-cuda installs the toolchain)')
    if len(args) != 4:
        sys.exit(__doc__)
    binary, name, tag, out_dir = args
    if not os.access(binary, os.X_OK):
        sys.exit(f'{binary}: not an executable (build it first)')
    os.makedirs(out_dir, exist_ok=True)
    # Debug info is most of a Rust binary; symbols stay, so backtraces still name functions.
    if shutil.which('strip'):
        stripped = os.path.join(out_dir, f'.{name}-{tag}.stripped')
        subprocess.run(['strip', '--strip-debug', '-o', stripped, binary], check=True)
        binary = stripped
    files = rootfs_files(binary, name, cuda_libs)
    layer = layer_tar(files)
    archive = os.path.join(out_dir, f'{name}-{tag}.oci.tar')
    compressed = oci_archive(archive, layer, name, tag, cuda=cuda_libs is not None)
    root = os.path.join(out_dir, f'{name}-{tag}-rootfs' if cuda_libs else f'{name}-rootfs')
    write_rootfs(files, root)
    if '--docker' in sys.argv:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dockerfile = os.path.join(repo, 'images', name.removeprefix('kiln-') + '.Dockerfile')
        docker_build(root, dockerfile, name, tag, repo)
    print(json.dumps({'image': f'{name}:{tag}', 'archive': archive, 'compressed_bytes': compressed,
                      'uncompressed_bytes': len(layer), 'files': sorted(p for p, _, _ in files)}))
    print(f'{name}:{tag}: {archive}, {compressed / 2**20:.1f} MiB compressed, '
          f'{len(layer) / 2**20:.1f} MiB unpacked, {len(files)} files', file=sys.stderr)


if __name__ == '__main__':
    main()
