#!/usr/bin/env bash
# Runs every test, installing first what the tests need: fuse3, Nix 2.8 (nix-bin), a static
# busybox (the /bin/sh of test builds), s3s-fs (the S3 server) and Nix 2.30.5, built from source
# once into its own prefix (scripts/nix-2.30.sh). Debian 12, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v nix-store >/dev/null || missing+=(nix-bin)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v xz >/dev/null || missing+=(xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! s3s-fs --version 2>/dev/null | grep -q '0\.14\.1'; then
  echo "installing s3s-fs 0.14.1 (takes a few minutes)"
  cargo install --quiet s3s-fs --version 0.14.1 --features binary
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the FUSE tests cannot run here" >&2; exit 1; }
# A modern Nix beside Debian's 2.8, for the tests that run both: built on the first run only.
./scripts/nix-2.30.sh
export FLYWHEEL_NIX230="${FLYWHEEL_NIX230_PREFIX:-/opt/flywheel/nix-2.30.5}"

cargo test --workspace "$@"
