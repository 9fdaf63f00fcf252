#!/usr/bin/env bash
# Alternating A/B of two weightgate binaries on the audited tiny-file GET rate, each round
# next to an nginx run (access log on), for machines whose speed drifts within minutes.
# Usage: bench/ab.sh BIN_A BIN_B [ROUNDS]     (nginx and wrk as bench/run.sh installs them)
# Extra server settings for both: export them (e.g. WEIGHTGATE__AUDIT__DOWNLOADS=false).
# Prints per round: req/s, the ratio to that round's nginx, and server CPU µs per request.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
A=$1 B=$2 ROUNDS=${3:-3} SECS=${SECS:-5}
OUT=$BENCH/out/ab PORT=${AB_PORT:-18490} NG_PORT=${AB_NG_PORT:-18483}
LIB="python3 $BENCH/lib.py"
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"
EMAIL=ab@example.org WG_DATA=$OUT/wg WG_BIND=127.0.0.1:$PORT TMP=$OUT URL=http://127.0.0.1:$PORT
wg() { "$A" "$@"; }
rm -rf "$OUT" && mkdir -p "$OUT/nginx" "$OUT/small"
$LIB mkdata-small "$OUT/small" 20
PIDS=()
trap ab_cleanup EXIT
ab_nginx "sendfile on; access_log $OUT/nginx/access.log;" small/part-000.bin
export WEIGHTGATE__DATA_DIR=$WG_DATA WEIGHTGATE__SERVER__BIND=$WG_BIND
ab_model ab/small "$OUT/small"
rate() { # URL [wrk args] -> "req/s requests"
    local out
    out=$(wrk -t2 -c64 -d"${SECS}s" "$@")
    if grep -q 'Non-2xx' <<<"$out"; then echo "non-2xx answers from $1" >&2; exit 1; fi
    awk '/Requests\/sec/ {r=$2} /requests in/ {n=$1} END {print r, n}' <<<"$out"
}
for round in $(seq 1 "$ROUNDS"); do
    read -r ng _ < <(rate "http://127.0.0.1:$NG_PORT/small/part-000.bin")
    line="round $round: nginx $ng"
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        ab_start "$bin"
        t0=$(cpu_ticks "$WG")
        read -r rps n < <(rate "$URL/ab/small/resolve/main/part-000.bin" -H "Authorization: Bearer $TOKEN")
        t1=$(cpu_ticks "$WG")
        ab_stop
        line+=$(awk -v s="$side" -v r="$rps" -v g="$ng" -v d=$((t1 - t0)) -v n="$n" -v hz="$(getconf CLK_TCK)" \
            'BEGIN { printf " | %s %.0f (%.3f) %.1f us", s, r, r / g, d / hz * 1e6 / n }')
    done
    echo "$line"
done
