#!/usr/bin/env bash
# Builds Nix 2.30.5 from source once, into its own prefix, so the tests can run a modern Nix
# beside Debian 12's nix-bin 2.8 (/usr/bin/nix*, /usr/lib/nix), which it does not touch.
# Debian 12, as root. The first run took 19m51s at -O3 beside light other work on 2 cores, and
# 22m34s at -O1 in the background of a whole test run; later runs return in a fraction of a second.
#
#   FLYWHEEL_NIX230_PREFIX  where Nix goes (default /opt/flywheel/nix-2.30.5)
#   FLYWHEEL_NIX230_SOURCE  the source tarball (default /work/shared/third-party/nix-2.30.5.tar.gz)
#   FLYWHEEL_NIX230_BUILD   the build directory (default /var/cache/flywheel/nix-2.30.5-build)
#
# Recovery: the prefix counts as done only once its stamp file holds this recipe's build id, which
# is written last, after a test build. An interrupted run leaves the build directory behind and
# the next run continues from it (ninja and cmake rebuild only what is missing); the build
# directory is removed after a successful install.
set -euo pipefail

version=2.30.5
# The sha256 of `git archive --prefix=nix-2.30.5/ 2.30.5` (commit 3a1c0b40158384a8ad4e1229c67336ed96cec721).
source_sha256=1403ce3a53566edfc241e01e28969d6c77c93adf0debd5050043d6e165df88f1
prefix=${FLYWHEEL_NIX230_PREFIX:-/opt/flywheel/nix-$version}
source_tarball=${FLYWHEEL_NIX230_SOURCE:-/work/shared/third-party/nix-$version.tar.gz}
build=${FLYWHEEL_NIX230_BUILD:-/var/cache/flywheel/nix-$version-build}
stamp=$prefix/.flywheel-nix-complete
# What the stamp holds. Bump the number after the dash whenever this script builds differently,
# so that prefixes built by an older recipe are rebuilt.
build_id=$version-3
# Marks a prefix as this script's, so a rebuild may delete it (and never anything else).
marker=$prefix/.flywheel-nix-prefix

installed() {
  [ "$(cat "$stamp" 2>/dev/null)" = "$build_id" ] &&
    [ "$("$prefix/bin/nix" --version 2>/dev/null)" = "nix (Nix) $version" ]
}
if installed; then
  echo "Nix $version is already built in $prefix"
  exit 0
fi
# --check: only say (by the exit status) whether the prefix is built.
if [ "${1:-}" = "--check" ]; then
  exit 1
fi

# Several worktrees may run the tests at once: one builds, the others wait and then reuse it.
mkdir -p "$(dirname "$build")"
exec 9>"$build.lock"
if ! flock -n 9; then
  echo "waiting for another build of Nix $version to finish"
  flock 9
fi
if installed; then
  echo "Nix $version is already built in $prefix"
  exit 0
fi

started=$SECONDS
echo "building Nix $version into $prefix (15 minutes on 2 idle cores, more on busy ones; build directory $build)"

[ -f "$source_tarball" ] || { echo "missing the Nix source: $source_tarball" >&2; exit 1; }
echo "$source_sha256  $source_tarball" | sha256sum --check --quiet -

if [ -e "$prefix" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$prefix")" ]; then
  echo "$prefix exists and was not made by this script: refusing to replace it" >&2
  exit 1
fi

# Debian 12 packages. libgit2 1.9 and BLAKE3 are not among them (built below); Boehm GC is
# left out (see the meson options). liblowdown-dev needs libbsd-dev and libmd-dev. The static
# busybox becomes the built-in sandbox shell (the /bin/sh of builds), as in the tests.
packages=(
  build-essential pkg-config cmake bison flex python3-venv busybox-static
  libboost1.81-dev libboost-context1.81-dev libboost-coroutine1.81-dev
  libboost-container1.81-dev libboost-iostreams1.81-dev libboost-regex1.81-dev
  libssl-dev libarchive-dev libsodium-dev libbrotli-dev libsqlite3-dev zlib1g-dev
  nlohmann-json3-dev libtoml11-dev libreadline-dev liblowdown-dev libbsd-dev libmd-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
# Either flavour of libcurl's headers will do; install the OpenSSL one only if neither is there.
pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  # Other test runs may hold the dpkg lock for a while: wait for it instead of failing.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    "${missing[@]}" >/dev/null
fi

mkdir -p "$build"

# meson (>= 1.4 for Nix) and ninja from pip: Debian's meson 1.0 is too old. In a venv of the
# build directory, so neither the repo nor the system Python changes. /usr/bin/python3, not
# whatever python3 is first on PATH (pyenv shims, for one).
venv=$build/venv
if [ "$("$venv/bin/meson" --version 2>/dev/null)" != 1.12.1 ] ||
  [ "$("$venv/bin/ninja" --version 2>/dev/null)" != 1.13.2 ]; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check meson==1.12.1 ninja==1.13.2
fi
export PATH="$venv/bin:$HOME/.cargo/bin:$PATH"

# The C sources of libgit2 1.9.7 and BLAKE3 1.8.7 ship inside the crates libgit2-sys and blake3;
# `cargo vendor` of a throwaway project that depends on exactly those versions fetches them.
vendor=$build/vendor
if [ ! -d "$vendor" ]; then
  proj=$build/vendor-project
  rm -rf "$proj" "$vendor.tmp"
  mkdir -p "$proj/src"
  : >"$proj/src/lib.rs"
  cat >"$proj/Cargo.toml" <<'EOF'
[package]
name = "nix-c-deps"
version = "0.0.0"
edition = "2021"

[dependencies]
# 0.18.8+1.9.7: cargo ignores the +metadata in a requirement, and 0.18.8 has only that one.
libgit2-sys = { version = "=0.18.8", default-features = false }
blake3 = { version = "=1.8.7", default-features = false }
EOF
  (cd "$proj" && cargo vendor --quiet --versioned-dirs "$vendor.tmp" >/dev/null)
  mv "$vendor.tmp" "$vendor"
fi
libgit2_src=$vendor/libgit2-sys-0.18.8+1.9.7/libgit2
blake3_src=$vendor/blake3-1.8.7/c

if [ -e "$prefix" ]; then
  rm -rf "$prefix" # an unfinished install, or one by an older recipe: start afresh
fi
mkdir -p "$prefix"
touch "$marker"

# Both libraries go into the prefix itself, as shared libraries beside Nix's own: Nix's meson
# build finds them there through pkg-config, and the rpath below finds them at run time.
cmake_dep() { # name source-dir extra-cmake-options...
  local name=$1 src=$2
  shift 2
  cmake -S "$src" -B "$build/$name" -G Ninja -Wno-dev \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib \
    -DBUILD_SHARED_LIBS=ON "$@" >"$build/$name.log"
  cmake --build "$build/$name" >>"$build/$name.log"
  cmake --install "$build/$name" >>"$build/$name.log"
}
echo "building libgit2 1.9.7"
# Nix uses libgit2 for local repositories only (fetching runs git); no SSH, GSSAPI or NTLM.
cmake_dep libgit2 "$libgit2_src" -DBUILD_TESTS=OFF -DBUILD_CLI=OFF -DBUILD_EXAMPLES=OFF \
  -DUSE_SSH=OFF -DUSE_GSSAPI=OFF -DUSE_NTLMCLIENT=OFF -DUSE_HTTPS=OpenSSL -DREGEX_BACKEND=builtin
echo "building BLAKE3 1.8.7"
cmake_dep blake3 "$blake3_src"

src=$build/src/nix-$version
if [ ! -f "$src/meson.build" ]; then
  rm -rf "$build/src" "$build/src.tmp"
  mkdir -p "$build/src.tmp"
  tar -xzf "$source_tarball" -C "$build/src.tmp"
  mv "$build/src.tmp" "$build/src"
fi

# Why each option:
# - libdir=lib: one flat lib directory, the one the rpath names.
# - sysconfdir in the prefix: this Nix reads $prefix/etc/nix/nix.conf (written below), not
#   Debian's /etc/nix/nix.conf. localstatedir stays /nix/var: the same store, state and
#   database schema (10) as 2.8.
# - gc disabled: Debian's gc/gc_allocator.h breaks eval.cc with Boost containers (evaluation
#   memory is then never freed, fine for tests).
# - cpuid and seccomp disabled: Debian 12 has no libcpuid, and its libseccomp 2.5.4 is too old.
# - readline: Debian 12 has no editline (the default flavour).
# - no unit tests, language bindings or documentation: none is needed to run Nix.
# - -O1: the tests need a correct Nix, not a fast evaluator, and -O1 compiles in less time
#   than the release default (-O3); the build is most of a fresh machine's first test run.
meson_options=(
  --prefix="$prefix" --libdir=lib --sysconfdir="$prefix/etc" --buildtype=release -Doptimization=1
  -Dunit-tests=false -Dbindings=false -Ddoc-gen=false
  -Dlibexpr:gc=disabled -Dlibutil:cpuid=disabled -Dlibstore:seccomp-sandboxing=disabled
  -Dlibcmd:readline-flavor=readline -Dlibcmd:markdown=enabled
)
# Debian's nix-bin ships libnixstore.so and friends under the same names in /usr/lib/nix.
# An rpath to our own lib directory makes the 2.30 binaries load their own libraries; DT_RPATH
# (not RUNPATH) so that it also wins over LD_LIBRARY_PATH and covers indirect dependencies.
export LDFLAGS="-Wl,-rpath,$prefix/lib -Wl,--disable-new-dtags"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
export CMAKE_PREFIX_PATH="$prefix"
nix_build=$build/nix
# A build directory configured with other options (an older version of this script) starts over.
if [ "$(cat "$nix_build/.flywheel-options" 2>/dev/null)" != "${meson_options[*]} $LDFLAGS" ]; then
  rm -rf "$nix_build"
  echo "configuring Nix"
  meson setup "$nix_build" "$src" "${meson_options[@]}" >"$build/meson-setup.log" ||
    { tail -n 40 "$build/meson-setup.log" >&2; exit 1; }
  echo "${meson_options[*]} $LDFLAGS" >"$nix_build/.flywheel-options"
fi
echo "compiling Nix (log: $build/ninja.log)"
ninja -C "$nix_build" -j "$(nproc)" >"$build/ninja.log" ||
  { grep -B2 -A20 -m3 'FAILED\|error:' "$build/ninja.log" >&2 || tail -n 40 "$build/ninja.log" >&2; exit 1; }
meson install -C "$nix_build" --quiet >"$build/meson-install.log"
mkdir -p "$prefix/etc/nix"
cat >"$prefix/etc/nix/nix.conf" <<'EOF'
# Written by scripts/nix-2.30.sh (GloriousFlywheel).
# As Debian's /etc/nix/nix.conf says for its Nix 2.8: the sandbox does not work on Debian.
sandbox = false
# Built without libseccomp (Debian 12's 2.5.4 is older than the 2.5.5 Nix needs), this Nix
# cannot install its syscall filter, and with the default (true) every build fails with
# "seccomp is not supported on this platform".
filter-syscalls = false
EOF

# Check, before declaring it done, that the new Nix runs, loads none of Debian's 2.8 libraries
# and builds a derivation (in a throwaway chroot store, as the tests do).
[ "$("$prefix/bin/nix" --version)" = "nix (Nix) $version" ] ||
  { echo "$prefix/bin/nix does not report $version" >&2; exit 1; }
libs=$(ldd "$prefix/bin/nix")
if grep -q '/usr/lib/nix/\|not found' <<<"$libs"; then
  echo "$prefix/bin/nix loads libraries it should not:" >&2
  echo "$libs" >&2
  exit 1
fi
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
# shellcheck disable=SC2016 # $out is the builder's, not ours
built=$(env -u NIX_CONFIG -u NIX_REMOTE XDG_CACHE_HOME="$check/xdg" "$prefix/bin/nix-build" \
  --store "$check/root" --no-out-link --option substituters '' --option build-users-group '' \
  -E 'derivation { name = "check"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }' \
  2>"$check/log") || { cat "$check/log" >&2; exit 1; }
[ "$(cat "$check/root$built")" = ok ] || { echo "$prefix/bin/nix-build built nothing" >&2; exit 1; }
echo "$build_id" >"$stamp"
rm -rf "$build"

elapsed=$((SECONDS - started))
printf 'built Nix %s into %s in %dm%02ds\n' "$version" "$prefix" $((elapsed / 60)) $((elapsed % 60))
