#!/usr/bin/env bash
# Alternating A/B of two weightgate binaries on verified download throughput and server CPU
# per GB, each round next to nginx (sendfile on) serving the same bytes, for machines whose
# speed drifts within minutes.
# Usage: bench/ab-stream.sh BIN_A BIN_B [ROUNDS]
#   CLIENTS=N concurrent curls per run (default 1); SIZE_MIB=file size (default 2048).
# Prints per round: GB/s and CPU-s/GB for nginx, A and B. Every download's size is checked,
# and one download per side is checked against the file's SHA-256.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
A=$1 B=$2 ROUNDS=${3:-3} CLIENTS=${CLIENTS:-1} SIZE_MIB=${SIZE_MIB:-2048}
OUT=$BENCH/out/ab-stream PORT=${AB_PORT:-18491} NG_PORT=${AB_NG_PORT:-18484}
LIB="python3 $BENCH/lib.py"
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"
EMAIL=ab@example.org WG_DATA=$OUT/wg WG_BIND=127.0.0.1:$PORT TMP=$OUT URL=http://127.0.0.1:$PORT
wg() { "$A" "$@"; }
rm -rf "$OUT/wg" "$OUT/nginx" && mkdir -p "$OUT/nginx" "$OUT/big"
SIZE=$((SIZE_MIB << 20))
if [ "$(stat -c %s "$OUT/big/model.bin" 2>/dev/null || echo 0)" != "$SIZE" ]; then
    head -c "$SIZE" /dev/urandom >"$OUT/big/model.bin"
fi
SHA=$(sha256sum "$OUT/big/model.bin" | cut -d' ' -f1)
PIDS=()
trap ab_cleanup EXIT
ab_nginx "sendfile on; tcp_nopush on; access_log off;" big/model.bin
export WEIGHTGATE__DATA_DIR=$WG_DATA WEIGHTGATE__SERVER__BIND=$WG_BIND
ab_model ab/big "$OUT/big"
find "$WG_DATA" -type f -size +1M -exec cat {} + >/dev/null
WG_URL="$URL/ab/big/resolve/main/model.bin"
for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    ab_start "$bin"
    got=$(curl -fsS -H "Authorization: Bearer $TOKEN" "$WG_URL" | sha256sum | cut -d' ' -f1)
    ab_stop
    [ "$got" = "$SHA" ] || { echo "side $side served bytes with the wrong SHA-256" >&2; exit 1; }
done
run() { # PIDS_FN URL [curl args] -> "GB/s CPU-s/GB"
    local pids_fn=$1 url=$2 t0 t1 c0 c1 i p ps=()
    shift 2
    c0=$(cpu_ticks $($pids_fn))
    t0=$(date +%s.%N)
    for i in $(seq 1 "$CLIENTS"); do
        curl -fsS -o /dev/null -w '%{size_download}\n' "$@" "$url" >"$OUT/c.$i" & ps+=($!)
    done
    for p in "${ps[@]}"; do wait "$p"; done
    t1=$(date +%s.%N)
    c1=$(cpu_ticks $($pids_fn))
    for i in $(seq 1 "$CLIENTS"); do
        [ "$(cat "$OUT/c.$i")" = "$SIZE" ] || { echo "a download was cut short" >&2; exit 1; }
    done
    awk -v b=$((CLIENTS * SIZE)) -v t0="$t0" -v t1="$t1" -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.2f %.2f", b / (t1 - t0) / 1e9, d / hz / (b / 1e9) }'
}
ng_pids() { ps -o pid= --ppid "$NGINX_PID" | tr -d ' '; }
wg_pid() { echo "$WG"; }
echo "$CLIENTS client(s), $SIZE_MIB MiB: GB/s, CPU-s/GB"
for round in $(seq 1 "$ROUNDS"); do
    line="round $round: nginx $(run ng_pids "http://127.0.0.1:$NG_PORT/big/model.bin")"
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        ab_start "$bin"
        line+=" | $side $(run wg_pid "$WG_URL" -H "Authorization: Bearer $TOKEN")"
        ab_stop
    done
    echo "$line"
done
