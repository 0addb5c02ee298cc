# Shared setup of the GPU scripts (tools/gpu_run.sh, tools/gpu_all.sh,
# tools/gpu_serve_smoke.sh, bench/gpu_serve.sh); sourced from the
# repository root, never run.  It
#   * puts .dev/lib (make gpu-bundle: libyajl, libyaml, libpcre2, ... for a
#     machine without them) first on LD_LIBRARY_PATH,
#   * picks the nginx binary: $NGINX, else .dev/nginx, else /usr/sbin/nginx,
#   * sets OUT (default ./gpu-out) and makes it,
#   * starts nginx in the foreground as a child (gpu_nginx_start), records
#     its pid, and stops it by that pid when the script exits (trap), waiting
#     for the master to exit (it waits for its worker, which frees the GPU),
#   * refuses to start when the port is already taken, so a script never
#     talks to another script's server.
# Bash only.

GPU_ROOT=$PWD
if [ -d "$GPU_ROOT/.dev/lib" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in
    *":$GPU_ROOT/.dev/lib:"*) ;;
    *) export LD_LIBRARY_PATH=$GPU_ROOT/.dev/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
    esac
fi
if [ -z "${NGINX:-}" ]; then
    if [ -x "$GPU_ROOT/.dev/nginx" ]; then
        NGINX=$GPU_ROOT/.dev/nginx
    else
        NGINX=/usr/sbin/nginx
    fi
fi
OUT=${OUT:-$GPU_ROOT/gpu-out}
mkdir -p "$OUT"

GPU_NGINX_PIDS=()

# gpu_port_busy PORT: true when something accepts connections on 127.0.0.1:PORT
gpu_port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# gpu_nginx_start CONF PORT ERROR_LOG: starts "$NGINX -p $GPU_ROOT/ -c CONF"
# in the foreground as a background child; sets GPU_NGINX_PID.  Fails when
# PORT (the conf's listen port) is taken or the conf does not test clean.
gpu_nginx_start() {
    local conf=$1 port=$2 log=$3
    if gpu_port_busy "$port"; then
        echo "gpu_env: port $port is already taken (another server is" \
             "running): not starting $conf" >&2
        return 1
    fi
    mkdir -p "$GPU_ROOT/build/run" "$(dirname "$GPU_ROOT/$log")"
    "$NGINX" -p "$GPU_ROOT/" -c "$conf" -e "$log" -g 'daemon off;' &
    GPU_NGINX_PID=$!
    GPU_NGINX_PIDS+=("$GPU_NGINX_PID")
    echo "gpu_env: $NGINX -c $conf: pid $GPU_NGINX_PID, port $port"
}

# gpu_wait_health PORT SECONDS [ERROR_LOG]: waits until GET /health answers
# 200; returns 1 when the server started last exits, its error log shows an
# [emerg] or a worker that cannot be respawned (the engine failed to start),
# or the time is up.
gpu_wait_health() {
    local port=$1 limit=$2 log=${3:-} i
    for ((i = 0; i < limit * 2; i++)); do
        if [ -n "${GPU_NGINX_PID:-}" ] && ! kill -0 "$GPU_NGINX_PID" 2>/dev/null; then
            echo "gpu_env: nginx (pid $GPU_NGINX_PID) exited before answering" >&2
            return 1
        fi
        if [ -n "$log" ] && grep -q 'cannot be respawned\|\[emerg\]' "$log" 2>/dev/null; then
            echo "gpu_env: nginx failed to start (from $log):" >&2
            grep 'cannot be respawned\|\[emerg\]\|\[crit\]\|\[error\]' "$log" | tail -5 >&2
            return 1
        fi
        if python3 - "$port" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen("http://127.0.0.1:%s/health" % sys.argv[1], timeout=2).read()
PY
        then
            return 0
        fi
        sleep 0.5
    done
    echo "gpu_env: no answer from 127.0.0.1:$port/health in $limit s" >&2
    return 1
}

# gpu_nginx_stop [PID]: TERM to the master, wait up to 60 s for it to exit
# (after its worker), then KILL.  Default: every server this script started.
gpu_nginx_stop() {
    local pids=("$@") p i
    [ ${#pids[@]} -gt 0 ] || pids=("${GPU_NGINX_PIDS[@]}")
    for p in "${pids[@]}"; do
        kill -0 "$p" 2>/dev/null || continue
        kill -TERM "$p" 2>/dev/null
        for ((i = 0; i < 120; i++)); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$p" 2>/dev/null; then
            echo "gpu_env: nginx pid $p still running after 60 s: KILL" >&2
            kill -KILL "$p" 2>/dev/null
        fi
        wait "$p" 2>/dev/null
        echo "gpu_env: nginx pid $p stopped"
    done
    GPU_NGINX_PIDS=()
}

trap 'gpu_nginx_stop' EXIT
trap 'exit 130' INT TERM

# gpu_bench_tokenizer: puts the Mistral 32k tokenizer beside the bench
# model's config (bench/models/mixtral-8x7b, ignored by git), from the
# bundle (.dev/tok/llama2) or from tools/fetch_tokenizers.sh's build/tok.
gpu_bench_tokenizer() {
    local dst=bench/models/mixtral-8x7b/tokenizer.json src
    for src in .dev/tok/llama2/tokenizer.json build/tok/llama2/tokenizer.json; do
        if [ -f "$src" ]; then
            cmp -s "$src" "$dst" || cp "$src" "$dst"
            return 0
        fi
    done
    [ -f "$dst" ] && return 0
    echo "gpu_env: no tokenizer for bench/models/mixtral-8x7b: carry .dev" \
         "(make gpu-bundle) or build/tok/llama2" >&2
    return 1
}

# gpu_step NAME LIMIT CMD...: runs CMD with a time limit, output to
# $OUT/NAME.log; records rc and seconds in GPU_RC[NAME] / GPU_SEC[NAME].
declare -A GPU_RC GPU_SEC
GPU_STEPS=()
gpu_step() {
    local name=$1 limit=$2 t0 t1
    shift 2
    GPU_STEPS+=("$name")
    t0=$(date +%s)
    echo "=== $name (limit $limit s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    GPU_RC[$name]=$?
    t1=$(date +%s)
    GPU_SEC[$name]=$((t1 - t0))
    echo "=== $name: rc ${GPU_RC[$name]} in ${GPU_SEC[$name]} s (log $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log"
}
