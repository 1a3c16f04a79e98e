#!/usr/bin/env bash
# Builds Attic's server (atticd, atticadm) once, for the end-to-end benchmark's same-run
# comparison, into /opt/flywheel/attic (ATTIC_PREFIX). Never part of the repo or the tests.
#   scripts/attic.sh            build if needed; print the prefix
#   scripts/attic.sh --check    exit 0 if built, 1 if not
# Attic's source comes from ATTIC_SRC (a checkout or a git directory), else from a mirror of
# its repository at /work/.mirror/zhaofengli+attic/repo; the commit is ATTIC_REV (b7c9056, the
# one the issues measured). Its crates come from crates.io, pinned by its Cargo.lock.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
PREFIX="${ATTIC_PREFIX:-/opt/flywheel/attic}"
REV="${ATTIC_REV:-b7c9056}"
SRC_REPO="${ATTIC_SRC:-/work/.mirror/zhaofengli+attic/repo}"
# Kept between runs, so that an interrupted build resumes.
TARGET=/var/cache/flywheel/attic-target

built() { "$PREFIX/bin/atticd" --help >/dev/null 2>&1 && [ -x "$PREFIX/bin/atticadm" ]; }
if [ "${1:-}" = "--check" ]; then
  built
  exit
fi
if built; then
  echo "$PREFIX"
  exit 0
fi
if [ ! -e "$SRC_REPO" ]; then
  echo "no Attic source: set ATTIC_SRC to a checkout of https://github.com/zhaofengli/attic" >&2
  exit 2
fi
src=/var/cache/flywheel/attic-src-$REV
if [ ! -e "$src/Cargo.lock" ]; then
  rm -rf "$src" && mkdir -p "$src"
  if [ -f "$SRC_REPO/Cargo.lock" ] && [ ! -d "$SRC_REPO/objects" ]; then
    cp -a "$SRC_REPO/." "$src/"
  else
    git -C "$SRC_REPO" archive "$REV" | tar -x -C "$src"
  fi
fi
mkdir -p "$PREFIX/bin" "$TARGET"
echo "building atticd $REV (target dir $TARGET; about 15 minutes on 2 cores)" >&2
CARGO_TARGET_DIR="$TARGET" cargo build --release --locked --manifest-path "$src/Cargo.toml" -p attic-server >&2
install -m 0755 "$TARGET/release/atticd" "$TARGET/release/atticadm" "$PREFIX/bin/"
echo "$PREFIX"
