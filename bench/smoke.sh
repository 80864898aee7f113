#!/usr/bin/env bash
# Checks sni-load against a throw-away nginx on loopback, then prints a few typical numbers.
#
#   bench/smoke.sh [--no-numbers]
#
# Uses the nginx of target/sni_guard.env (from scripts/build) unless NGINX_BIN is set, and
# builds sni-load in $CARGO_TARGET_DIR (default /tmp/target-bench) unless SNI_LOAD is set.
# nginx runs pinned to CPU 0 (one worker), sni-load to CPU 1. Everything stops by itself; the
# nginx this starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

numbers=1
[ "${1:-}" = --no-numbers ] && numbers=0

if [ -z "${NGINX_BIN:-}" ]; then
    # shellcheck disable=SC1091
    . target/sni_guard.env
fi
if [ -z "${SNI_LOAD:-}" ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
    cargo build -q --release -p sni_guard_bench
    SNI_LOAD=$CARGO_TARGET_DIR/release/sni-load
fi

dir=$(mktemp -d /tmp/sni-load-smoke.XXXXXX)
nginx_pid=
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    if [ -n "$nginx_pid" ]; then
        kill "$nginx_pid" 2>/dev/null || true
        wait "$nginx_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/key.pem" -out "$dir/cert.pem" \
    -days 2 -subj /CN=bench.example 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
closed_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_cpu_affinity 01;
pid $dir/nginx.pid;
error_log $dir/error.log notice;
events { worker_connections 4096; }
http {
    log_format names '\$remote_addr \$ssl_server_name';
    access_log $dir/access.log names;
    ssl_certificate $dir/cert.pem;
    ssl_certificate_key $dir/key.pem;
    server {
        listen 127.0.0.1:$port ssl default_server;
        server_name _;
        return 200 "ok";
    }
    server {
        listen 127.0.0.1:$port ssl;
        server_name refused.example;
        ssl_reject_handshake on;
    }
}
EOF
mkdir -p "$dir/logs"
taskset -c 0 "$NGINX_BIN" -p "$dir" -c "$dir/nginx.conf" &
nginx_pid=$!
for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
    sleep 0.1
done

load() {
    taskset -c 1 "$SNI_LOAD" --addr "127.0.0.1:${target_port:-$port}" "$@" 2>"$dir/stderr"
}

failed=0
# check DESCRIPTION PYTHON-CONDITION-ON-j SNI-LOAD-ARGS...
check() {
    local what=$1 cond=$2
    shift 2
    local out
    out=$(load "$@") || true
    if python3 -c "import json,sys; j=json.loads(sys.argv[1]); sys.exit(0 if ($cond) else 1)" \
        "$out" 2>/dev/null; then
        echo "ok   $what: $out"
    else
        echo "FAIL $what: $out $(cat "$dir/stderr")"
        failed=1
    fi
}

check "full mode completes" 'j["attempts"]==20 and j["completed"]==20' \
    --mode full --names ok.example --max 20 --duration 10
check "full mode TLS 1.2 completes" 'j["attempts"]==20 and j["completed"]==20' \
    --mode full --tls12 --names ok.example --max 20 --duration 10
check "full mode with request completes" 'j["attempts"]==20 and j["completed"]==20' \
    --mode full --request --names ok.example --max 20 --duration 10
check "full mode gets alert 112 for refused.example" \
    'j["attempts"]==20 and j["alerts"]=={"112":20} and j["completed"]==0 and j["errors"]==0' \
    --mode full --names refused.example --max 20 --duration 10
check "full mode TLS 1.2 gets alert 112" 'j["alerts"]=={"112":20}' \
    --mode full --tls12 --names refused.example --max 20 --duration 10
check "hello mode gets alert 112 for refused.example" \
    'j["attempts"]==20 and j["alerts"]=={"112":20} and j["errors"]==0' \
    --mode hello --names refused.example --max 20 --duration 10
check "hello mode gets a handshake for other names" \
    'j["attempts"]==20 and j["completed"]==20 and j["errors"]==0' \
    --mode hello --names random:smoke --max 20 --duration 10

printf 'refused.example\n# a comment\n\nok.example\n' >"$dir/names"
check "names file round-robin over 4 threads" \
    'j["attempts"]==40 and j["alerts"]=={"112":20} and j["completed"]==20' \
    --mode full --names "@$dir/names" --max 40 --concurrency 4 --duration 10

: >"$dir/access.log"
check "random names with requests" 'j["completed"]==200' \
    --mode full --request --names random:distinct --max 200 --concurrency 2 --duration 20
total=$(wc -l <"$dir/access.log")
distinct=$(awk '{print $2}' "$dir/access.log" | sort -u | wc -l)
if [ "$total" = 200 ] && [ "$distinct" = 200 ]; then
    echo "ok   random names are distinct: $distinct of $total requests"
else
    echo "FAIL random names are distinct: $distinct of $total requests"
    failed=1
fi

: >"$dir/access.log"
check "--source 127.0.0.2" 'j["completed"]==5' \
    --mode full --request --source 127.0.0.2 --names ok.example --max 5 --duration 10
from=$(grep -c '^127\.0\.0\.2 ' "$dir/access.log" || true)
if [ "$from" = 5 ]; then
    echo "ok   nginx saw 5 requests from 127.0.0.2"
else
    echo "FAIL nginx saw $from requests from 127.0.0.2, not 5"
    failed=1
fi

check "--rate 50 for 2 s gives about 100 attempts" \
    '90 <= j["attempts"] <= 100 and 45 <= j["rate"] <= 51' \
    --mode hello --names refused.example --rate 50 --duration 2 --concurrency 2
check "--max 7 over 3 threads stops at 7" 'j["attempts"]==7' \
    --mode full --names ok.example --max 7 --concurrency 3 --duration 30
check "--duration 1 stops after about 1 s" '1.0 <= j["duration_s"] < 1.5 and j["attempts"] > 10' \
    --mode full --names ok.example --duration 1 --concurrency 2
target_port=$closed_port check "a closed port is a connect error" \
    'j["attempts"]==3 and j["errors"]==3 and j["error_kinds"]=={"connect":3}' \
    --mode hello --names a.example --max 3 --duration 5

if [ "$numbers" = 1 ]; then
    echo "typical numbers (nginx worker on CPU 0, sni-load on CPU 1, 5 s each):"
    for args in "--mode full --names ok.example --concurrency 1" \
        "--mode full --names ok.example --concurrency 2" \
        "--mode full --tls12 --names ok.example --concurrency 2" \
        "--mode full --names refused.example --concurrency 2" \
        "--mode hello --names refused.example --concurrency 1" \
        "--mode hello --names refused.example --concurrency 2" \
        "--mode hello --names random:num --concurrency 2"; do
        # shellcheck disable=SC2086
        echo "  $args: $(load $args --duration 5)"
    done
fi
exit "$failed"
