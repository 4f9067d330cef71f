#!/usr/bin/env bash
# Keep the shared build cache bounded. Every clone at a new path (CI, a worktree) compiles the
# workspace crates under new hashes beside the old ones, so the dev build directory grows by
# gigabytes per clone until the disk fills and the linker fails. When it passes the limit,
# drop the incremental state first, then the whole dev profile (a cold rebuild, never a
# failed one).
set -euo pipefail
target="${CARGO_TARGET_DIR:?CARGO_TARGET_DIR must be set}"
limit_gib="${KILN_TARGET_LIMIT_GIB:-30}"
size_gib() { [ -d "$1" ] && du -s --block-size=1G "$1" | cut -f1 || echo 0; }

[ -d "$target/debug" ] || exit 0
if [ "$(size_gib "$target")" -gt "$limit_gib" ]; then
  echo "prune-target: $target is over ${limit_gib} GiB; removing debug/incremental" >&2
  rm -rf "$target/debug/incremental"
fi
if [ "$(size_gib "$target")" -gt "$limit_gib" ]; then
  echo "prune-target: still over ${limit_gib} GiB; removing the dev profile (next build is cold)" >&2
  rm -rf "$target/debug"
fi
