#!/usr/bin/env bash
# The end-to-end benchmark: installs the reference tools (nginx, zstd, xz, bzip2, brotli, curl, and Attic's
# server, built from its repository) and the test prerequisites, then runs `cargo bench --bench e2e`, which writes BENCHMARKS.md.
# Pass section names (server, packs, compression, lazy, job, load, fuse, substituter, tfstate) to run only those.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in nginx:nginx-light zstd:zstd xz:xz-utils bzip2:bzip2 brotli:brotli curl:curl nix-store:nix-bin fusermount3:fuse3; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# nginx's package starts a service on port 80; the benchmark runs its own instance.
systemctl stop nginx 2>/dev/null || service nginx stop 2>/dev/null || true
# Attic's server, built once from its repository (scripts/attic.sh), for the server section's
# same-run comparison; without it the section says so and compares with the other references.
if [ $# -eq 0 ] || [[ " $* " == *server* ]]; then
  ./scripts/attic.sh >/dev/null || echo "Attic could not be built; the server section compares without it" >&2
fi
cargo bench --bench e2e -- "$@"
