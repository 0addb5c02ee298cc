#!/usr/bin/env bash
# Prefix affinity on and off: two LocalMoE nodes (the CPU backend, the tiny
# model unless MODEL says otherwise) behind a front nginx made from
# conf/router.conf, driven by bench/serve with multi-turn conversations.
#   affinity: upstream { hash $moe_prefix_key consistent; }  (conf/router.conf)
#   round robin: the same front without the hash line
# Each mode starts fresh nodes (empty prefix caches) and a fresh front, so
# no run inherits the other's cache.  Prints the prefix cache hit rate
# (usage cached_tokens over prompt tokens) and TTFT of both.
#
#   bench/router.sh                       # after make (module + bench)
#   CONVERSATIONS=16 TURNS=4 SYSTEM_WORDS=300 OUTPUT_LEN=32 CONCURRENCY=4 \
#   BASE_PORT=18100 OUT=build/bench-router bench/router.sh
#
# Every nginx started here is stopped by its pid before the script exits.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
NGINX=${NGINX:-/usr/sbin/nginx}
SO=$ROOT/build/nginx/objs/ngx_http_moe_module.so
SERVE=$ROOT/build/bench/serve
MODEL=${MODEL:-$ROOT/models/localmoe-tiny}
CONVERSATIONS=${CONVERSATIONS:-16}
TURNS=${TURNS:-4}
SYSTEM_WORDS=${SYSTEM_WORDS:-300}
OUTPUT_LEN=${OUTPUT_LEN:-32}
CONCURRENCY=${CONCURRENCY:-4}
BASE_PORT=${BASE_PORT:-18100}
OUT=${OUT:-$ROOT/build/bench-router}
PF=$BASE_PORT P1=$((BASE_PORT + 1)) P2=$((BASE_PORT + 2))

[ -f "$SO" ] || { echo "$SO missing: make module" >&2; exit 1; }
[ -x "$SERVE" ] || { echo "$SERVE missing: make bench" >&2; exit 1; }
mkdir -p "$OUT"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/localmoe-router-XXXXXX")
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do
        kill -QUIT "$p" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null
    done
    PIDS=()
}
trap 'stop_all; rm -rf "$TMP"' EXIT
USER_LINE=
[ "$(id -u)" = 0 ] && USER_LINE="user root;"

# a LocalMoE node on port $2 in directory $1
node_conf() {
    local d=$1 port=$2
    mkdir -p "$d"
    cat > "$d/engine.yaml" <<EOF
engine:
  backend: cpu
vllm:
  model_name: "$MODEL"
  max_model_len: 2048
  block_size: 16
  max_num_seqs: 64
  enable_prefix_caching: true
EOF
    cat > "$d/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
error_log $d/error.log info;
pid $d/nginx.pid;
load_module $SO;
events { worker_connections 1024; }
http {
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
    access_log off;
    client_body_buffer_size 1m;
    moe_engine $d/engine.yaml;
    server {
        listen 127.0.0.1:$port;
        location / { moe_api; }
    }
}
EOF
}

# the front: conf/router.conf on our ports and paths; $2 = 0 drops the hash
front_conf() {
    local d=$1 affinity=$2
    mkdir -p "$d"
    sed -e "s|127.0.0.1:8080|127.0.0.1:$PF|" \
        -e "s|127.0.0.1:8000|127.0.0.1:$P1|" \
        -e "s|127.0.0.1:8001|127.0.0.1:$P2|" \
        -e "s|build/front/|$d/|g" \
        -e "s|build/nginx/objs/ngx_http_moe_module.so|$SO|" \
        -e "s|^worker_processes .*|$USER_LINE worker_processes 1;|" \
        conf/router.conf > "$d/nginx.conf"
    if [ "$affinity" = 0 ]; then
        sed -i '/hash  *\$moe_prefix_key consistent;/d' "$d/nginx.conf"
    fi
}

start_nginx() {
    local d=$1
    "$NGINX" -p "$d/" -c "$d/nginx.conf" -e "$d/error.log" \
        -g 'daemon off;' > "$d/stdout.log" 2>&1 &
    PIDS+=($!)
}

wait_health() {
    local port=$1 i
    for i in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
        sleep 0.1
    done
    echo "no /health on port $port" >&2
    return 1
}

run_mode() {
    local name=$1 affinity=$2 d=$TMP/$1
    node_conf "$d/n1" $P1
    node_conf "$d/n2" $P2
    front_conf "$d/front" "$affinity"
    start_nginx "$d/n1"
    start_nginx "$d/n2"
    wait_health $P1 && wait_health $P2 || { stop_all; return 1; }
    start_nginx "$d/front"
    wait_health $PF || { stop_all; return 1; }
    echo "== $name: $CONVERSATIONS conversations x $TURNS turns," \
         "system $SYSTEM_WORDS words, max_tokens $OUTPUT_LEN," \
         "concurrency $CONCURRENCY" | tee "$OUT/$name.txt"
    "$SERVE" --base-url "http://127.0.0.1:$PF" \
        --endpoint /v1/chat/completions --turns "$TURNS" \
        --num-prompts "$CONVERSATIONS" --random-input-len "$SYSTEM_WORDS" \
        --random-output-len "$OUTPUT_LEN" --max-concurrency "$CONCURRENCY" \
        --seed 1 --json "$OUT/$name.json" --quiet >> "$OUT/$name.txt"
    local rc=$?
    # requests each node served (its own counters), then stop everything
    for p in $P1 $P2; do
        printf 'node :%s /v1/stats/performance: ' $p >> "$OUT/$name.txt"
        curl -s "http://127.0.0.1:$p/v1/stats/performance" \
            | tr -d '\n' | cut -c1-300 >> "$OUT/$name.txt"
        echo >> "$OUT/$name.txt"
    done
    stop_all
    return $rc
}

status=0
run_mode affinity 1 || status=1
run_mode round_robin 0 || status=1

printf '\n%-28s %12s %12s\n' "" "affinity" "round robin"
for label in "Successful requests:" "Failed requests:" \
             "Prefix cache hit rate (%):" "Cached prompt tokens:" \
             "Prompt tokens (with usage):" "Mean TTFT (ms):" \
             "Median TTFT (ms):" "P99 TTFT (ms):" \
             "Mean TTFT, first turns (ms):" "Mean TTFT, later turns (ms):" \
             "Benchmark duration (s):"; do
    a=$(grep -F "$label" "$OUT/affinity.txt" | awk '{print $NF}')
    b=$(grep -F "$label" "$OUT/round_robin.txt" | awk '{print $NF}')
    printf '%-28s %12s %12s\n' "${label%:}" "${a:--}" "${b:--}"
done
echo "(reports: $OUT/affinity.txt, $OUT/round_robin.txt; --json beside them)"
exit $status
