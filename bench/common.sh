# Shell functions shared by run.sh and ab.sh. The caller sets LIB, and for wg_token also
# defines wg (the weightgate CLI with the server's settings) and sets WG_DATA, WG_BIND, TMP and
# EMAIL.

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
