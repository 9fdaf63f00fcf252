#!/usr/bin/env bash
# weightgate vs nginx on the same files, same machine, same run. See bench/README.md.
# Usage: bench/run.sh            (build first: CARGO_TARGET_DIR=target/bench cargo build --release)
set -euo pipefail
shopt -s inherit_errexit

BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT=$BENCH/out
WG_BIN=${WG_BIN:-$ROOT/target/bench/release/weightgate}
HF_BIN_SET=${HF_BIN:-}
HF_BIN=${HF_BIN:-$ROOT/.venv/bin/hf}
LIB="python3 $BENCH/lib.py"
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"
NG_ON=${NG_ON:-18181}     # nginx, sendfile on,  access_log off (throughput)
NG_OFF=${NG_OFF:-18182}   # nginx, sendfile off, access_log off (throughput)
NG_LOG=${NG_LOG:-18183}   # nginx, sendfile on,  access_log on  (tiny-file rate, TTFB, small files)
WG_PORT=${WG_PORT:-18190}
WG_PG_PORT=${WG_PG_PORT:-18191}
WG_NOAUDIT_PORT=${WG_NOAUDIT_PORT:-18192}
WRK_SECS=${WRK_SECS:-10}
RSS_CLIENTS=64
RSS_RANGE_MIB=${RSS_RANGE_MIB:-128}
TTFB_N=${TTFB_N:-200}
SMALL_N=200
BIG_SIZE=2147483648
EMAIL=bench@example.org
CLK_TCK=$(getconf CLK_TCK)

DATA=$OUT/data
BIG_DIR=$DATA/big
BIG=$BIG_DIR/model.bin
SMALL_DIR=$DATA/small
TINY=part-000.bin
TMP=$OUT/tmp
METRICS=$OUT/metrics.tsv

FAIL=0
SERVER_PIDS=()
PG_DB=""
NGINX_PID=""
WG_PID=""

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "FAILED: $*"; printf 'status\tFAILED: %s\n' "$*" >>"$METRICS"; FAIL=1; }
row() { printf 'row\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$METRICS"; }
meta() { printf 'meta\t%s\n' "$*" >>"$METRICS"; }
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }
now() { date +%s.%N; }

cleanup() {
    local rc=$?
    set +e
    # background clients we started (curl, wrk), then the servers, by pid
    for p in $(jobs -p); do
        case " ${SERVER_PIDS[*]} " in *" $p "*) ;; *) kill "$p" 2>/dev/null ;; esac
    done
    for p in "${SERVER_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in "${SERVER_PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    if [ -n "$PG_DB" ]; then
        psql -h 127.0.0.1 -U postgres -qtAc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1 \
            || log "could not drop database $PG_DB"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ prerequisites
[ -x "$WG_BIN" ] || { echo "no $WG_BIN; build with: cd $ROOT && CARGO_TARGET_DIR=$ROOT/target/bench cargo build --release" >&2; exit 2; }
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ ! -x "$HF_BIN" ] && [ -z "${HF_BIN_SET:-}" ]; then
    # the same virtualenv and pinned client that scripts/test.sh uses
    log "installing huggingface-hub 2.4.0 into $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "huggingface-hub==2.4.0"
fi

rm -rf "$OUT/wg" "$OUT/wg-pg" "$OUT/hf_home" "$OUT/dl" "$TMP" "$OUT/nginx"
mkdir -p "$DATA" "$TMP" "$OUT/nginx" "$OUT/dl"
: >"$METRICS"

# ------------------------------------------------------------------ data
if [ "$(stat -c %s "$BIG" 2>/dev/null || echo 0)" != "$BIG_SIZE" ]; then
    log "writing 2 GiB of random bytes to $BIG"
    mkdir -p "$BIG_DIR"
    (openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:$(od -An -tx8 -N16 /dev/urandom | tr -d ' ')" \
        -in /dev/zero 2>/dev/null || true) | head -c "$BIG_SIZE" >"$BIG.tmp"
    mv "$BIG.tmp" "$BIG"
fi
if [ "$(ls "$SMALL_DIR" 2>/dev/null | wc -l)" != "$SMALL_N" ]; then
    rm -rf "$SMALL_DIR"
    $LIB mkdata-small "$SMALL_DIR" "$SMALL_N"
fi
log "sha256 of the source file"
SRC_SHA=$(sha256sum "$BIG" | cut -d' ' -f1)
cat "$BIG" >/dev/null

# ------------------------------------------------------------------ nginx
cat >"$OUT/nginx/nginx.conf" <<EOF
user root;
worker_processes auto;
daemon off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $OUT/nginx/tmp_body;
    proxy_temp_path $OUT/nginx/tmp_proxy;
    fastcgi_temp_path $OUT/nginx/tmp_fcgi;
    uwsgi_temp_path $OUT/nginx/tmp_uwsgi;
    scgi_temp_path $OUT/nginx/tmp_scgi;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$NG_ON;  root $DATA; sendfile on;  tcp_nopush on; access_log off; }
    server { listen 127.0.0.1:$NG_OFF; root $DATA; sendfile off; access_log off; }
    server { listen 127.0.0.1:$NG_LOG; root $DATA; sendfile on;  tcp_nopush on; access_log $OUT/nginx/access.log; }
}
EOF
"$NGINX" -t -q -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx/"
"$NGINX" -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx/" &
NGINX_PID=$!
SERVER_PIDS+=("$NGINX_PID")

wait_http "http://127.0.0.1:$NG_ON/small/$TINY"
ng_workers() { ps -o pid= --ppid "$NGINX_PID" | tr -d ' '; }

# ------------------------------------------------------------------ weightgate
WG_DATA=""; WG_BIND=""; WG_DBURL=""; WG_EXTRA=()
wg() {
    local envs=(WEIGHTGATE__DATA_DIR="$WG_DATA" WEIGHTGATE__SERVER__BIND="$WG_BIND")
    [ -n "$WG_DBURL" ] && envs+=(WEIGHTGATE__DATABASE__URL="$WG_DBURL")
    env "${envs[@]}" "$WG_BIN" "$@"
}
wg_start() { # LOGFILE -> sets WG_PID
    local envs=(WEIGHTGATE__DATA_DIR="$WG_DATA" WEIGHTGATE__SERVER__BIND="$WG_BIND")
    [ -n "$WG_DBURL" ] && envs+=(WEIGHTGATE__DATABASE__URL="$WG_DBURL")
    envs+=("${WG_EXTRA[@]}")
    ensure_free "http://$WG_BIND/healthz" || exit 1
    env "${envs[@]}" "$WG_BIN" serve >"$1" 2>&1 &
    WG_PID=$!
    SERVER_PIDS+=("$WG_PID")
    wait_http "http://$WG_BIND/healthz"
}

WG_DATA=$OUT/wg WG_BIND=127.0.0.1:$WG_PORT WG_DBURL=""
log "importing bench/big and bench/small"
t0=$(now)
wg models add bench/big --from "$BIG_DIR" >"$TMP/import-big.log" 2>&1
t1=$(now)
wg models add bench/small --from "$SMALL_DIR" >"$TMP/import-small.log" 2>&1
IMPORT_S=$(calc "$t1 - $t0")
# The reference: coreutils hashing the same bytes (SHA-256 only, no copy), from the page cache.
t0=$(now)
sha256sum "$BIG_DIR/model.bin" >/dev/null
t1=$(now)
SHA256SUM_S=$(calc "$t1 - $t0")
meta "weightgate models add of the 2 GiB file (SHA-256 + BLAKE3 + copy): $IMPORT_S s; sha256sum of it: $SHA256SUM_S s"
wg_start "$OUT/wg.log"
TOK_BIG=$(wg_token bench/big)
TOK_SMALL=$(wg_token bench/small)
[ -n "$TOK_BIG" ] && [ -n "$TOK_SMALL" ] || { echo "no token" >&2; exit 1; }
# warm the page cache with weightgate's own copy of the blob
find "$WG_DATA" -type f -size +1G -exec cat {} + >/dev/null

WG_URL=http://$WG_BIND
WG_BIG=$WG_URL/bench/big/resolve/main/model.bin
WG_TINY=$WG_URL/bench/small/resolve/main/$TINY
AUTH_BIG="Authorization: Bearer $TOK_BIG"
AUTH_SMALL="Authorization: Bearer $TOK_SMALL"
WG_DOWNLOADS=0   # every GET download weightgate answered with a body

# ------------------------------------------------------------------ helpers
server_ticks() { # wg | nginx
    if [ "$1" = wg ]; then cpu_ticks "$WG_PID"; else cpu_ticks $(ng_workers); fi
}
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

# run N concurrent curl downloads; sets B_BYTES B_OK B_SECS. extra curl args after URL.
run_batch() { # NAME N URL [curl args...]
    local name=$1 n=$2 url=$3 i p t0 t1 pids=()
    shift 3
    rm -f "$TMP/$name".*
    t0=$(now)
    for i in $(seq 1 "$n"); do
        curl -sS -o /dev/null -w '%{size_download} %{time_total}\n' "$@" "$url" >"$TMP/$name.$i" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail "a curl of $name failed"; done
    t1=$(now)
    read -r B_BYTES B_OK < <($LIB batch "$TMP/$name".*)
    B_SECS=$(calc "$t1 - $t0")
}

# ------------------------------------------------------------------ 1. throughput + CPU/GB
# Each server gets REPS runs of 1 client and of 8 clients, taken in turns (nginx on, nginx
# off, weightgate, then again), so that a noisy spell on this shared machine does not land
# on one server only; the table shows each server's median, CPU is summed over all its runs.
REPS=${REPS:-3}
declare -A GBPS1 GBPS8 CPUGB TICKS BYTES RUNS1 RUNS8
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
one_run() { # LABEL KIND CLIENTS URL [curl args]
    local label=$1 kind=$2 n=$3 url=$4 c0 c1
    shift 4
    c0=$(server_ticks "$kind")
    run_batch "${label}_c$n" "$n" "$url" "$@"
    c1=$(server_ticks "$kind")
    [ "$B_BYTES" = "$((n * BIG_SIZE))" ] || fail "$label c=$n got $B_BYTES bytes, expected $((n * BIG_SIZE))"
    TICKS[$label]=$((${TICKS[$label]:-0} + c1 - c0))
    BYTES[$label]=$((${BYTES[$label]:-0} + B_BYTES))
    if [ "$n" = 1 ]; then
        RUNS1[$label]="${RUNS1[$label]:-} $(calc "$B_BYTES / $B_SECS / 1e9")"
    else
        RUNS8[$label]="${RUNS8[$label]:-} $(calc "$B_BYTES / $B_SECS / 1e9")"
    fi
}
for rep in $(seq 1 "$REPS"); do
    for n in 1 8; do
        log "throughput: round $rep of $REPS, $n client(s)"
        one_run ng_on nginx "$n" "http://127.0.0.1:$NG_ON/big/model.bin"
        one_run ng_off nginx "$n" "http://127.0.0.1:$NG_OFF/big/model.bin"
        one_run wg wg "$n" "$WG_BIG" -H "$AUTH_BIG"
        WG_DOWNLOADS=$((WG_DOWNLOADS + n))
    done
done
for label in ng_on ng_off wg; do
    GBPS1[$label]=$(echo "${RUNS1[$label]}" | median)
    GBPS8[$label]=$(echo "${RUNS8[$label]}" | median)
    CPUGB[$label]=$(calc "${TICKS[$label]} / $CLK_TCK / (${BYTES[$label]} / 1e9)")
    log "  $label: c1 ${GBPS1[$label]} GB/s (runs:${RUNS1[$label]}), c8 ${GBPS8[$label]} GB/s (runs:${RUNS8[$label]}), ${CPUGB[$label]} CPU-s/GB"
    meta "$label runs, GB/s: 1 client${RUNS1[$label]}; 8 clients${RUNS8[$label]}"
done

row "2 GiB download, 1 client, GB/s vs nginx sendfile on" "${GBPS1[wg]}" "${GBPS1[ng_on]}" higher
row "2 GiB download, 1 client, GB/s vs nginx sendfile off" "${GBPS1[wg]}" "${GBPS1[ng_off]}" higher
row "2 GiB download, 8 clients, GB/s vs nginx sendfile on" "${GBPS8[wg]}" "${GBPS8[ng_on]}" higher
row "2 GiB download, 8 clients, GB/s vs nginx sendfile off" "${GBPS8[wg]}" "${GBPS8[ng_off]}" higher
row "server CPU s per GB served vs nginx sendfile on" "${CPUGB[wg]}" "${CPUGB[ng_on]}" lower
row "server CPU s per GB served vs nginx sendfile off" "${CPUGB[wg]}" "${CPUGB[ng_off]}" lower
row "import of the 2 GiB file (SHA-256 + BLAKE3 + copy), s, vs sha256sum of it" "$IMPORT_S" "$SHA256SUM_S" lower

log "sha256 of a full weightgate download"
WG_SHA=$(curl -fsS -H "$AUTH_BIG" "$WG_BIG" | sha256sum | cut -d' ' -f1)
WG_DOWNLOADS=$((WG_DOWNLOADS + 1))
if [ "$WG_SHA" = "$SRC_SHA" ]; then
    meta "SHA-256 of a full weightgate download matches the source file ($SRC_SHA)"
else
    fail "SHA-256 of the weightgate download ($WG_SHA) differs from the source ($SRC_SHA)"
fi

# ------------------------------------------------------------------ 2. peak RSS, 64 clients
rss_run() { # NAME URL [curl args] ; 64 ranged downloads of RSS_RANGE_MIB at 8 different offsets
    local name=$1 url=$2 i p off len pids=() t0 t1
    shift 2
    len=$((RSS_RANGE_MIB * 1048576))
    rm -f "$TMP/$name".*
    t0=$(now)
    for i in $(seq 0 $((RSS_CLIENTS - 1))); do
        off=$(((i % 8) * 256 * 1048576))
        curl -sS -o /dev/null -w '%{size_download} %{time_total}\n' -H "Range: bytes=$off-$((off + len - 1))" \
            "$@" "$url" >"$TMP/$name.$i" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail "a curl of $name failed"; done
    t1=$(now)
    read -r B_BYTES B_OK < <($LIB batch "$TMP/$name".*)
    B_SECS=$(calc "$t1 - $t0")
    [ "$B_BYTES" = "$((RSS_CLIENTS * len))" ] || fail "$name got $B_BYTES bytes, expected $((RSS_CLIENTS * len))"
}
log "64 concurrent ranged downloads"
WG_HWM0=$(hwm_kib "$WG_PID")
rss_run wg_rss "$WG_BIG" -H "$AUTH_BIG"
WG_RSS_GBPS=$(calc "$B_BYTES / $B_SECS / 1e9")
WG_HWM=$(hwm_kib "$WG_PID")
WG_DOWNLOADS=$((WG_DOWNLOADS + RSS_CLIENTS))
rss_run ng_rss "http://127.0.0.1:$NG_ON/big/model.bin"
NG_RSS_GBPS=$(calc "$B_BYTES / $B_SECS / 1e9")
NG_HWM=0
for p in $(ng_workers); do NG_HWM=$((NG_HWM + $(hwm_kib "$p"))); done
row "peak RSS MiB, 64 clients x ${RSS_RANGE_MIB} MiB Range of the 2 GiB file (nginx: sum of workers, sendfile on)" \
    "$(calc "$WG_HWM / 1024")" "$(calc "$NG_HWM / 1024")" lower
row "aggregate GB/s, 64 clients x ${RSS_RANGE_MIB} MiB Range (nginx sendfile on)" "$WG_RSS_GBPS" "$NG_RSS_GBPS" higher
meta "weightgate VmHWM before the 64-client run: $(calc "$WG_HWM0 / 1024") MiB, after: $(calc "$WG_HWM / 1024") MiB"

# ------------------------------------------------------------------ 3. tiny-file request rate (wrk)
wrk_rate() { # NAME URL [wrk args] -> sets W_RPS W_REQS, checks errors
    local name=$1 url=$2
    shift 2
    wrk -t2 -c64 -d"${WRK_SECS}s" --latency "$@" "$url" >"$TMP/wrk_$name.txt" 2>&1 || fail "wrk $name exited non-zero"
    W_RPS=$(awk '/^Requests\/sec:/ {print $2}' "$TMP/wrk_$name.txt")
    W_REQS=$(awk '/requests in/ {print $1}' "$TMP/wrk_$name.txt")
    W_P99=$(awk '$1 == "99%" {print $2}' "$TMP/wrk_$name.txt")
    if grep -q 'Non-2xx or 3xx' "$TMP/wrk_$name.txt"; then
        fail "wrk $name: $(grep 'Non-2xx or 3xx' "$TMP/wrk_$name.txt" | tr -s ' ')"
    fi
    if grep -q 'Socket errors' "$TMP/wrk_$name.txt"; then
        meta "wrk $name: $(grep 'Socket errors' "$TMP/wrk_$name.txt" | tr -s ' ')"
    fi
    log "  wrk $name: ${W_RPS:-?} req/s (${W_REQS:-?} requests, p99 ${W_P99:-?})"
    [ -n "$W_RPS" ] || { fail "wrk $name printed no rate"; W_RPS=0; W_REQS=0; }
}
audit_downloads() { wg audit export --format jsonl | grep -c file_download || true; }

log "wrk: tiny-file GET"
wrk_rate ng_get "http://127.0.0.1:$NG_LOG/small/$TINY"
NG_GET=$W_RPS; NG_GET_P99=$W_P99
wrk_rate wg_get "$WG_TINY" -H "$AUTH_SMALL"
WG_GET=$W_RPS; WG_GET_P99=$W_P99
WG_DOWNLOADS=$((WG_DOWNLOADS + W_REQS))
row "tiny-file ($(stat -c %s "$SMALL_DIR/$TINY") B) GET req/s, wrk 64 conns (audit-heavy path; nginx access_log on)" "$WG_GET" "$NG_GET" higher
meta "wrk latency p99: weightgate $WG_GET_P99, nginx $NG_GET_P99 (tiny GET, 64 connections)"

A0=$(audit_downloads)
WG_ETAG=$(curl -fsS -o /dev/null -D - -H "$AUTH_SMALL" "$WG_TINY" | awk -F': ' 'tolower($1)=="etag" {print $2}' | tr -d '\r')
NG_ETAG=$(curl -fsS -o /dev/null -D - "http://127.0.0.1:$NG_LOG/small/$TINY" | awk -F': ' 'tolower($1)=="etag" {print $2}' | tr -d '\r')
WG_DOWNLOADS=$((WG_DOWNLOADS + 1))
log "wrk: If-None-Match -> 304"
wrk_rate ng_304 "http://127.0.0.1:$NG_LOG/small/$TINY" -H "If-None-Match: $NG_ETAG"
NG_304=$W_RPS
wrk_rate wg_304 "$WG_TINY" -H "$AUTH_SMALL" -H "If-None-Match: $WG_ETAG"
WG_304=$W_RPS
A1=$(audit_downloads)
row "tiny-file conditional GET (If-None-Match, 304, no body) req/s" "$WG_304" "$NG_304" higher
meta "the 304 path is audited too: file_download lines written during the 304 run: $((A1 - A0)) for $W_REQS requests"
wrk_rate wg_health "$WG_URL/healthz"
meta "weightgate GET /healthz (no auth, no file, no audit): $W_RPS req/s"

# the same GETs from a second server on the same data dir, with other audit settings, while
# the first one idles
side_rate() { # NAME ENV... -> sets W_RPS W_REQS (wrk against the second server)
    local name=$1 main_pid=$WG_PID main_bind=$WG_BIND keep p
    shift
    WG_BIND=127.0.0.1:$WG_NOAUDIT_PORT
    # the same public URL as the first server: tokens name it as their issuer and audience
    WG_EXTRA=("$@" WEIGHTGATE__SERVER__PUBLIC_URL=http://$main_bind)
    wg_start "$OUT/wg-$name.log"
    wrk_rate "$name" "http://$WG_BIND/bench/small/resolve/main/$TINY" -H "$AUTH_SMALL"
    kill -TERM "$WG_PID"; wait "$WG_PID" 2>/dev/null || true
    keep=(); for p in "${SERVER_PIDS[@]}"; do [ "$p" = "$WG_PID" ] || keep+=("$p"); done; SERVER_PIDS=("${keep[@]}")
    WG_PID=$main_pid WG_BIND=$main_bind WG_EXTRA=()
}

# download auditing off (audit.downloads = false): what the audit log costs per request
log "wrk: tiny-file GET with download auditing off"
A0=$(audit_downloads)
side_rate wg_get_noaudit WEIGHTGATE__AUDIT__DOWNLOADS=false
WG_GET_NOAUDIT=$W_RPS
A1=$(audit_downloads)
[ "$A1" = "$A0" ] || fail "audit.downloads = false still wrote $((A1 - A0)) file_download lines"
row "tiny-file GET req/s, download auditing on vs off (both weightgate; target >= 0.9)" "$WG_GET" "$WG_GET_NOAUDIT" higher

# audit.acknowledge = "queue": the last bytes leave once the final event is queued, not
# committed (what the wait for the commit costs); every event must still be in the log once
# the server has stopped
log "wrk: tiny-file GET with audit.acknowledge = queue"
A0=$(audit_downloads)
side_rate wg_get_queue WEIGHTGATE__AUDIT__ACKNOWLEDGE=queue
WG_GET_QUEUE=$W_RPS
WG_DOWNLOADS=$((WG_DOWNLOADS + W_REQS))
A1=$(audit_downloads)
# (wrk does not count the requests its 64 connections had in flight when it stopped)
[ $((A1 - A0)) -ge "$W_REQS" ] && [ $((A1 - A0)) -le $((W_REQS + 64)) ] \
    || fail "audit.acknowledge = queue logged $((A1 - A0)) downloads for $W_REQS requests"
row "tiny-file GET req/s, audit.acknowledge = queue (nginx access_log on)" "$WG_GET_QUEUE" "$NG_GET" higher
row "tiny-file GET req/s, audit.acknowledge = queue vs auditing off (both weightgate)" "$WG_GET_QUEUE" "$WG_GET_NOAUDIT" higher

# HEAD: wrk 4.1 hangs on HEAD responses, so oha (built once with cargo into bench/out/tools)
OHA=${OHA_BIN:-$OUT/tools/bin/oha}
if [ ! -x "$OHA" ] && command -v cargo >/dev/null; then
    log "building oha 1.16.0 once into $OUT/tools (about 5 minutes)"
    cargo install oha --version 1.16.0 --locked --root "$OUT/tools" >"$TMP/oha-install.log" 2>&1 \
        || log "could not build oha: $(tail -n1 "$TMP/oha-install.log")"
fi
oha_rate() { # NAME URL [oha args] -> sets O_RPS; a run with any answer but 200 fails
    local name=$1 url=$2 n bad
    shift 2
    "$OHA" -z "${WRK_SECS}s" -c 64 --no-tui --output-format json "$@" "$url" >"$TMP/oha_$name.json" 2>"$TMP/oha_$name.err" \
        || fail "oha $name exited non-zero: $(head -c 300 "$TMP/oha_$name.err")"
    read -r O_RPS n bad < <($LIB oha "$TMP/oha_$name.json" || echo "0 0 0")
    [ "$bad" = 0 ] || fail "oha $name: $bad of $n answers were not 200"
    log "  oha $name: $O_RPS req/s ($n requests)"
}
if [ -x "$OHA" ]; then
    log "oha: tiny-file HEAD"
    oha_rate ng_head "http://127.0.0.1:$NG_LOG/small/$TINY" -m HEAD
    NG_HEAD=$O_RPS
    oha_rate wg_head "$WG_TINY" -m HEAD -H "$AUTH_SMALL"
    row "tiny-file HEAD req/s, oha 64 conns (token checked, audited; nginx access_log on)" "$O_RPS" "$NG_HEAD" higher
else
    meta "oha not available: the HEAD rate was not measured"
fi

# ------------------------------------------------------------------ 4. TTFB p99
ttfb() { # FILE URL [curl args]
    local f=$1 url=$2 i
    shift 2
    : >"$f"
    for i in $(seq 1 "$TTFB_N"); do
        curl -fsS -o /dev/null -w '%{time_starttransfer}\n' "$@" "$url" >>"$f"
    done
}
log "TTFB, $TTFB_N sequential requests each"
ttfb "$TMP/ttfb_ng" "http://127.0.0.1:$NG_LOG/small/$TINY"
ttfb "$TMP/ttfb_wg" "$WG_TINY" -H "$AUTH_SMALL"
WG_DOWNLOADS=$((WG_DOWNLOADS + TTFB_N))
row "TTFB p99 ms, $TTFB_N sequential curl GETs of the tiny file" \
    "$(calc "$($LIB pct 99 "$TMP/ttfb_wg") * 1000")" "$(calc "$($LIB pct 99 "$TMP/ttfb_ng") * 1000")" lower
row "TTFB p50 ms, same requests" \
    "$(calc "$($LIB pct 50 "$TMP/ttfb_wg") * 1000")" "$(calc "$($LIB pct 50 "$TMP/ttfb_ng") * 1000")" lower

# ------------------------------------------------------------------ 5. small-file model: hf download vs curl
log "small-file model: hf download / curl -Z"
mkcfg() { # BASEURL PREFIX OUTDIR > cfg
    local f
    for f in $(ls "$SMALL_DIR"); do
        printf 'url = "%s/%s"\noutput = "%s/%s"\n' "$1" "$f" "$2" "$f"
    done
}
mkdir -p "$OUT/dl/ng" "$OUT/dl/wg"
mkcfg "http://127.0.0.1:$NG_LOG/small" "$OUT/dl/ng" >"$TMP/ng.cfg"
mkcfg "$WG_URL/bench/small/resolve/main" "$OUT/dl/wg" >"$TMP/wg.cfg"
t0=$(now); curl -fsS --no-progress-meter -Z --parallel-max 8 -K "$TMP/ng.cfg" 2>"$TMP/curlZ_ng.err" || fail "curl -Z nginx: $(head -c 300 "$TMP/curlZ_ng.err")"; t1=$(now)
NG_SMALL=$(calc "$t1 - $t0")
t0=$(now); curl -fsS --no-progress-meter -Z --parallel-max 8 -H "$AUTH_SMALL" -K "$TMP/wg.cfg" 2>"$TMP/curlZ_wg.err" || fail "curl -Z weightgate: $(head -c 300 "$TMP/curlZ_wg.err")"; t1=$(now)
WG_SMALL=$(calc "$t1 - $t0")
WG_DOWNLOADS=$((WG_DOWNLOADS + SMALL_N))
diff -rq "$SMALL_DIR" "$OUT/dl/ng" >/dev/null || fail "nginx small-file copy differs"
diff -rq "$SMALL_DIR" "$OUT/dl/wg" >/dev/null || fail "weightgate small-file copy differs"
mkdir -p "$OUT/hf_home"
t0=$(now)
HF_HOME=$OUT/hf_home HF_ENDPOINT=$WG_URL HF_TOKEN=$TOK_SMALL HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$HF_BIN" download bench/small >"$TMP/hf.log" 2>&1 \
    || { cat "$TMP/hf.log" >&2; fail "hf download bench/small failed"; }
t1=$(now)
HF_SECS=$(calc "$t1 - $t0")
HF_SNAP=$(grep -o '/[^ ]*/snapshots/[0-9a-f]*' "$TMP/hf.log" | tail -n1 || true)
if [ -d "$HF_SNAP" ] && diff -rq "$SMALL_DIR" "$HF_SNAP" >/dev/null; then
    WG_DOWNLOADS=$((WG_DOWNLOADS + SMALL_N))
else
    fail "hf download did not produce the $SMALL_N files (snapshot: $HF_SNAP)"
fi
row "$SMALL_N small files (1-8 KiB): hf download (weightgate) vs curl -Z x8 (nginx), s" "$HF_SECS" "$NG_SMALL" lower
row "$SMALL_N small files: curl -Z x8, s" "$WG_SMALL" "$NG_SMALL" lower

# ------------------------------------------------------------------ 6. PostgreSQL (optional)
PG_GET=""
if pg_isready -q -h 127.0.0.1 -p 5432 && psql -h 127.0.0.1 -U postgres -qtAc 'select 1' >/dev/null 2>&1; then
    log "PostgreSQL: fresh database, second weightgate"
    PG_DB=wg_bench_$$_$(date +%s)
    psql -h 127.0.0.1 -U postgres -qtAc "CREATE DATABASE $PG_DB" >/dev/null
    SQ_PID=$WG_PID
    WG_DATA=$OUT/wg-pg WG_BIND=127.0.0.1:$WG_PG_PORT WG_DBURL=postgres://postgres@127.0.0.1:5432/$PG_DB
    wg models add bench/small --from "$SMALL_DIR" >"$TMP/import-small-pg.log" 2>&1
    wg_start "$OUT/wg-pg.log"
    TOK_PG=$(wg_token bench/small)
    wrk_rate wg_pg_get "http://$WG_BIND/bench/small/resolve/main/$TINY" -H "Authorization: Bearer $TOK_PG"
    PG_GET=$W_RPS
    PG_DOWNLOADS=$W_REQS
    PG_AUDIT=$(audit_downloads)
    [ "$PG_AUDIT" -ge "$PG_DOWNLOADS" ] || fail "PostgreSQL audit has $PG_AUDIT file_download lines for $PG_DOWNLOADS downloads"
    kill -TERM "$WG_PID"; wait "$WG_PID" 2>/dev/null || true
    keep=(); for p in "${SERVER_PIDS[@]}"; do [ "$p" = "$WG_PID" ] || keep+=("$p"); done; SERVER_PIDS=("${keep[@]}")
    row "tiny-file GET req/s with PostgreSQL (nginx access_log on)" "$PG_GET" "$NG_GET" higher
    meta "weightgate tiny GET rate PostgreSQL/SQLite: $(calc "$PG_GET / $WG_GET")"
    WG_PID=$SQ_PID
    WG_DATA=$OUT/wg WG_BIND=127.0.0.1:$WG_PORT WG_DBURL=""
else
    meta "PostgreSQL on 127.0.0.1:5432 not reachable: PostgreSQL rate not measured"
fi

# ------------------------------------------------------------------ 7. audit count
sleep 1
AUDIT=$(audit_downloads)
meta "audit: $AUDIT file_download lines (weightgate audit export --format jsonl | grep -c file_download) for $WG_DOWNLOADS GET downloads made"
[ "$AUDIT" -ge "$WG_DOWNLOADS" ] || fail "audit has $AUDIT file_download lines, fewer than the $WG_DOWNLOADS downloads made"
wg audit verify >"$TMP/audit-verify.log" 2>&1 || fail "weightgate audit verify failed: $(tail -n1 "$TMP/audit-verify.log")"

# ------------------------------------------------------------------ report
meta "1 GB = 1e9 bytes. Clients (curl, wrk) run on the same $(nproc) cores as the servers. nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'), worker_processes auto; weightgate workers = 1 per core, SQLite unless stated."
meta "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
[ "$FAIL" = 0 ] && printf 'status\tall checks passed\n' >>"$METRICS"
$LIB report "$METRICS" "$OUT/results.md" "$OUT/ratios.svg"
log "wrote $OUT/results.md and $OUT/ratios.svg"
exit "$FAIL"
