#!/bin/bash
# Substituter and push benchmark (numbers for BENCHMARKS.md). Run from the repo root as root:
#   substituter/bench.sh target/release/flywheel
set -euo pipefail
FW=${1:?flywheel binary}
W=$(mktemp -d)
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nnarinfo-cache-negative-ttl = 0\nsandbox-paths = /bin/sh=/bin/busybox /bin/busybox=/bin/busybox\n'
unset NIX_REMOTE
xdg() { export XDG_CACHE_HOME=$W/xdg-$RANDOM$RANDOM; }
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

SECRET=$(head -c 32 /dev/urandom | base64)
printf 'token-hs256-secret-base64 = "%s"\n[storage]\ntype = "local"\npath = "%s/storage"\n' "$SECRET" "$W" > $W/server.toml
$FW serve --config $W/server.toml --listen 127.0.0.1:0 > $W/serve.out 2> $W/serve.log & PIDS+=($!)
until grep -q Listening $W/serve.out; do sleep 0.1; done
URL=$(sed -n 's/Listening on //p' $W/serve.out)
ADMIN=$($FW token mint --config $W/server.toml --sub bench --validity 1h --pull '*' --push '*' --create-cache '*' --configure-cache '*')
echo "$ADMIN" > $W/token
for c in ci whole; do
  curl -sf -X POST "$URL/_api/v1/cache-config/$c" -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d '{"keypair":"Generate","is_public":true,"store_dir":"/nix/store","priority":40,"upstream_cache_key_names":[]}' >/dev/null
done
KEY=$(curl -sf "$URL/_api/v1/cache-config/ci" -H "Authorization: Bearer $ADMIN" | sed 's/.*"public_key":"\([^"]*\)".*/\1/')

# Corpus: a 52 MB path, a 6 MB path and its next version, small paths.
SRC=$W/src
SEED=bench-$$-$RANDOM
xdg; PATHS=$(nix-build --option substituters "" --store $SRC --no-out-link tests/corpus.nix --argstr seed $SEED -A big -A tree -A single -A withRefs -A bigNext)
xdg; HUGE=$(nix-build --option substituters "" --store $SRC --no-out-link tests/common_fuse/corpus.nix --argstr seed $SEED -A huge)
BIG=$(echo "$PATHS" | sed -n 1p); NEXT=$(echo "$PATHS" | sed -n 5p)
CORPUS="$HUGE $(echo "$PATHS" | sed -n 1,4p | tr '\n' ' ')"
NARBYTES=0; for p in $CORPUS; do xdg; s=$(nix path-info --store $SRC --json $p | sed 's/.*"narSize":\([0-9]*\).*/\1/'); NARBYTES=$((NARBYTES+s)); done
echo "corpus: $(echo $CORPUS | wc -w) roots, $NARBYTES NAR bytes (closure adds refs)"

# --- push ---
xdg; t0=$(now); $FW push --server $URL --cache ci --token-file $W/token --store "local?root=$SRC" $CORPUS 2> $W/push1.log; t1=$(now)
echo "push corpus (cold server): $(el $t0 $t1) s; $(tail -1 $W/push1.log)"
xdg; t0=$(now); $FW push --server $URL --cache ci --token-file $W/token --store "local?root=$SRC" $NEXT 2> $W/push2.log; t1=$(now)
echo "push new version (bigNext): $(el $t0 $t1) s; $(tail -1 $W/push2.log)"
# whole-NAR upload-path of the same two versions into another cache
up() { local p=$1; local h=$(basename $p | cut -c1-32); xdg; local info=$(nix path-info --store $SRC --json $p)
  local nh=$(echo "$info" | sed 's/.*"narHash":"\([^"]*\)".*/\1/'); local ns=$(echo "$info" | sed 's/.*"narSize":\([0-9]*\).*/\1/')
  nix-store --dump $SRC$p > $W/nar
  curl -sf -X PUT "$URL/_api/v1/upload-path" -H "Authorization: Bearer $ADMIN" \
    -H "X-Attic-Nar-Info: {\"cache\":\"whole\",\"store_path_hash\":\"$h\",\"store_path\":\"$p\",\"references\":[],\"system\":null,\"deriver\":null,\"sigs\":[],\"ca\":null,\"nar_hash\":\"$nh\",\"nar_size\":$ns}" \
    --data-binary @$W/nar >/dev/null; echo $ns; }
up $BIG >/dev/null
t0=$(now); ns=$(up $NEXT); t1=$(now)
echo "upload-path whole NAR of bigNext: $(el $t0 $t1) s; $ns bytes sent"

# --- substitution ---
xdg; nix copy --store $SRC --to "file://$W/static?secret-key=" 2>/dev/null || true
nix-store --generate-binary-cache-key static-1 $W/sk $W/pk
xdg; nix copy --store $SRC --to "file://$W/static?secret-key=$W/sk" $CORPUS
PK=$(cat $W/pk)
realise() { local dst=$1 subs=$2 key=$3; xdg; local t0=$(now)
  nix-store --store $dst --realise $CORPUS --option substituters "$subs" --option trusted-public-keys "$key" --option require-sigs true >/dev/null 2>$W/realise.err || { cat $W/realise.err; exit 1; }
  local t1=$(now); el $t0 $t1; }
echo "substitute straight from server: $(realise $W/d-server "$URL/ci" "$KEY") s"
echo "substitute from static file:// cache: $(realise $W/d-static "file://$W/static" "$PK") s"
$FW substitute --server $URL --cache ci --cache-dir $W/subcache --listen 127.0.0.1:0 > $W/sub.out 2> $W/sub.log & PIDS+=($!)
until grep -q Listening $W/sub.out; do sleep 0.1; done
SUB=$(sed -n 's/Listening on //p' $W/sub.out)
echo "substitute via local substituter, cold cache: $(realise $W/d-cold "$SUB" "$KEY") s"
echo "substitute via local substituter, warm cache: $(realise $W/d-warm "$SUB" "$KEY") s"
echo "substitute via local substituter, warm again: $(realise $W/d-warm2 "$SUB" "$KEY") s"

# --- hook latency ---
$FW push-daemon --server $URL --cache ci --token-file $W/token --store "local?root=$SRC" --socket $W/push.sock 2> $W/daemon.log & PIDS+=($!)
until [ -S $W/push.sock ]; do sleep 0.1; done
DRV=$(nix-store --store $SRC -q --deriver $BIG)
LAT=()
for i in $(seq 20); do t0=$(now); DRV_PATH=$DRV OUT_PATHS= $FW hook --socket $W/push.sock; t1=$(now); LAT+=($(el $t0 $t1)); done
printf '%s\n' "${LAT[@]}" | sort -n > $W/lat
echo "hook latency over 20 runs: median $(sed -n 10p $W/lat) s, max $(tail -1 $W/lat) s"
t0=$(now); $FW flush --socket $W/push.sock 2>&1 | tail -1; t1=$(now); echo "flush: $(el $t0 $t1) s"
rm -rf $W
