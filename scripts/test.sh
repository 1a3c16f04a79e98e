#!/usr/bin/env bash
# Runs every test, installing first what the tests need: fuse3, Nix 2.8 (nix-bin), a static
# busybox (the /bin/sh of test builds) and s3s-fs (the S3 server). Debian 12, as root.
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

cargo test --workspace "$@"
