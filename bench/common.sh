# Shell functions shared by run.sh, ab.sh and ab-stream.sh. The caller sets LIB, and for
# wg_token also defines wg (the weightgate CLI with the server's settings) and sets WG_DATA,
# WG_BIND, TMP and EMAIL.

# fails when something already answers on URL: a server left over from an interrupted run
# would answer instead of the one about to start
ensure_free() { # URL
    if curl -s -o /dev/null "$1"; then
        echo "something already answers on $1 (a server left from an earlier run?)" >&2
        return 1
    fi
}

wait_http() { # URL
    for _ in $(seq 1 200); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2
    return 1
}

# apply -> confirm -> approve -> token, all through the real HTTP API and CLI; prints the token
wg_token() { # MODEL
    local model=$1 outbox=$WG_DATA/outbox seen=$TMP/seen.$$ link="" id
    ls "$outbox" 2>/dev/null >"$seen" || : >"$seen"
    curl -fsS -o "$TMP/apply.json" -X POST "http://$WG_BIND/api/v1/models/$model/applications" \
        -H 'content-type: application/json' \
        -d "{\"name\":\"Bench\",\"email\":\"$EMAIL\",\"affiliation\":\"Bench\",\"country\":\"FR\",\"intended_use\":\"benchmark\",\"accept_license\":true}"
    for _ in $(seq 1 150); do
        link=$($LIB confirm-link "$outbox" "$seen" 2>/dev/null) && break
        sleep 0.1
    done
    [ -n "$link" ] || { echo "no confirmation email for $model" >&2; return 1; }
    curl -fsS -o /dev/null "$link"
    id=$(wg applications list --status pending --json | $LIB app-id "$EMAIL" "$model")
    wg applications approve "$id" >/dev/null
    wg tokens issue --email "$EMAIL" --model "$model" | tail -n1 | tr -d '[:space:]'
}

cpu_ticks() { # PID... -> utime+stime ticks summed
    local t=0 p v
    for p in "$@"; do
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# ---- for the A/B scripts (ab.sh, ab-stream.sh). The caller sets OUT, NG_PORT, URL (weightgate's
# base URL), A (the binary that imports), PIDS=() and the variables wg_token needs.
ab_cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }

# starts nginx on 127.0.0.1:$NG_PORT serving $OUT, with DIRECTIVES in its server block; sets
# NGINX_PID once PATH answers
ab_nginx() { # DIRECTIVES PATH
    cat >"$OUT/nginx/nginx.conf" <<NG
user root; worker_processes auto; daemon off; pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn; events { worker_connections 4096; }
http { client_body_temp_path $OUT/nginx/tb; proxy_temp_path $OUT/nginx/tp; fastcgi_temp_path $OUT/nginx/tf;
  uwsgi_temp_path $OUT/nginx/tu; scgi_temp_path $OUT/nginx/ts; keepalive_requests 1000000;
  server { listen 127.0.0.1:$NG_PORT; root $OUT; $1 } }
NG
    nginx -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx/" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_http "http://127.0.0.1:$NG_PORT/$2"
}

WG=""
ab_start() {
    ensure_free "$URL/healthz" || return 1
    "$1" serve >"$OUT/wg.log" 2>&1 & WG=$!; PIDS+=("$WG"); wait_http "$URL/healthz"
}
ab_stop() { kill "$WG"; wait "$WG" 2>/dev/null || true; }

# imports DIR as MODEL with binary A, through the real API and CLI, and sets TOKEN to an
# approved token for it
ab_model() { # MODEL DIR
    "$A" models add "$1" --from "$2" >/dev/null
    ab_start "$A"
    TOKEN=$(wg_token "$1")
    ab_stop
}
