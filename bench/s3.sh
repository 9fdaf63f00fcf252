#!/usr/bin/env bash
# weightgate on S3-protocol storage against the S3 server itself: the same object fetched
# through weightgate (verified, audited) and straight from the server (unverified), in turns.
# The S3 server is moto on loopback (installed into .venv when missing), or any S3-protocol
# endpoint already running: S3_ENDPOINT, with S3_KEY and S3_SECRET.
# Usage: bench/s3.sh [SIZE_MIB]     (default 256; WG_BIN, REPS, S3_WG_PORT, MOTO_PORT)
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
WG_BIN=${WG_BIN:-$ROOT/target/bench/release/weightgate}
SIZE_MIB=${1:-256} REPS=${REPS:-3}
OUT=$BENCH/out/s3 PORT=${S3_WG_PORT:-18290} MOTO_PORT=${MOTO_PORT:-18299}
LIB="python3 $BENCH/lib.py"
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"
MOTO=$ROOT/.venv/bin/moto_server
if [ ! -x "$MOTO" ]; then
    echo "installing moto[server] 5.2.5 into $ROOT/.venv" >&2
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "moto[server]==5.2.5"
fi
EMAIL=s3@example.org WG_DATA=$OUT/wg WG_BIND=127.0.0.1:$PORT TMP=$OUT
S3_KEY=${S3_KEY:-bench} S3_SECRET=${S3_SECRET:-bench-secret} BUCKET=${S3_BUCKET:-weights}
rm -rf "$OUT" && mkdir -p "$OUT/model"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$OUT/model/model.bin"
SUM=$(sha256sum "$OUT/model/model.bin" | cut -d' ' -f1)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
if [ -z "${S3_ENDPOINT:-}" ]; then
    S3_ENDPOINT=http://127.0.0.1:$MOTO_PORT
    "$MOTO" -H 127.0.0.1 -p "$MOTO_PORT" >"$OUT/moto.log" 2>&1 &
    PIDS+=($!)
    wait_http "$S3_ENDPOINT"
fi
# The bucket (made if missing), the key weightgate stored the file under (the one that names
# its SHA-256) and a presigned URL for it, so the direct fetch is signed as weightgate's are.
s3py() { # COMMAND [KEY]
    "$ROOT/.venv/bin/python" - "$S3_ENDPOINT" "$S3_KEY" "$S3_SECRET" "$BUCKET" "$@" <<'PY'
import sys, boto3
endpoint, key_id, secret, bucket, cmd = sys.argv[1:6]
c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id,
                 aws_secret_access_key=secret, region_name="us-east-1")
if cmd == "bucket":
    if bucket not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
        c.create_bucket(Bucket=bucket)
elif cmd == "find":
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            if sys.argv[6] in o["Key"]:
                print(o["Key"])
elif cmd == "presign":
    print(c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": sys.argv[6]},
                                   ExpiresIn=3600))
PY
}
s3py bucket
export WEIGHTGATE__DATA_DIR=$WG_DATA WEIGHTGATE__SERVER__BIND=$WG_BIND \
    WEIGHTGATE__STORAGE__BACKEND=s3 WEIGHTGATE__STORAGE__S3_BUCKET=$BUCKET \
    WEIGHTGATE__STORAGE__S3_ENDPOINT=$S3_ENDPOINT WEIGHTGATE__STORAGE__S3_ACCESS_KEY_ID=$S3_KEY \
    WEIGHTGATE__STORAGE__S3_SECRET_ACCESS_KEY=$S3_SECRET
wg() { "$WG_BIN" "$@"; }
wg models add bench/s3 --from "$OUT/model" >/dev/null
KEY=$(s3py find "$SUM" | head -n1)
[ -n "$KEY" ] || { echo "no object for $SUM in the bucket" >&2; exit 1; }
DIRECT=$(s3py presign "$KEY")
"$WG_BIN" serve >"$OUT/wg.log" 2>&1 &
PIDS+=($!)
wait_http "http://$WG_BIND/healthz"
TOKEN=$(wg_token bench/s3)
fetch() { # URL [curl args] -> seconds; the bytes must match
    local t
    t=$(curl -fsS -o "$OUT/got" -w '%{time_total}' "$@")
    [ "$(sha256sum <"$OUT/got" | cut -d' ' -f1)" = "$SUM" ] || { echo "FAILED: bytes differ from $1" >&2; exit 1; }
    echo "$t"
}
echo "| run | S3 server direct, GB/s | through weightgate, GB/s | ratio |"
echo "| --- | ---: | ---: | ---: |"
for r in $(seq 1 "$REPS"); do
    d=$(fetch "$DIRECT")
    w=$(fetch "http://$WG_BIND/bench/s3/resolve/main/model.bin" -H "Authorization: Bearer $TOKEN")
    awk -v r="$r" -v d="$d" -v w="$w" -v b=$((SIZE_MIB << 20)) \
        'BEGIN { printf "| %d | %.3f | %.3f | %.2f |\n", r, b / d / 1e9, b / w / 1e9, d / w }'
done
