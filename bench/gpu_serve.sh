#!/usr/bin/env bash
# On the GPU machine: serve the Mixtral-8x7B shape (load_format dummy)
# through nginx and drive it with bench/serve at fixed concurrency, next to
# bench_engine's decode figure at the same batch.  The server (the bundle's
# nginx, make gpu-bundle) is stopped by pid before the script exits.
#   bench/gpu_serve.sh [CONCURRENCY] [NGINX]
# Environment: INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS, TEMPERATURE (default 0:
# greedy; > 0: tokens drawn on the GPU), EXTRA_JSON (members added to every
# request, e.g. a guided_json schema: bench/guided_serve.sh).  Output: $OUT/bench_serve.json,
# $OUT/bench_serve.txt, $OUT/bench_serve_error.log.
set -u
cd "$(dirname "$0")/.." || exit 2
C=${1:-64}
[ $# -ge 2 ] && NGINX=$2
. tools/gpu_env.sh

PORT=8000                           # bench/conf/nginx-bench.conf's listen
LOG=build/run/bench-error.log       # and its error_log
mkdir -p build/run
: > $LOG
save_log() { cp $LOG "$OUT/bench_serve_error.log" 2>/dev/null; }
trap 'gpu_nginx_stop; save_log' EXIT

gpu_bench_tokenizer || exit 1
[ -x build/bench/serve ] || { echo "build/bench/serve missing: make bench" >&2; exit 1; }
# BENCH_YAML=bench/conf/<x>.yaml serves another engine YAML (e.g.
# mixtral-8x7b-fp8-dummy.yaml: fp8 weights packed on the GPU) through a
# copy of the conf beside it (relative paths unchanged)
CONF=bench/conf/nginx-bench.conf
if [ -n "${BENCH_YAML:-}" ]; then
    CONF=bench/conf/.nginx-bench-yaml.conf
    sed "s|mixtral-8x7b-dummy.yaml|$(basename "$BENCH_YAML")|" \
        bench/conf/nginx-bench.conf > $CONF
fi
gpu_nginx_start $CONF $PORT $LOG || exit 1
gpu_wait_health $PORT 240 $LOG || { tail -20 $LOG; exit 1; }
grep 'moe:' $LOG | tail -3
set -o pipefail
build/bench/serve --base-url http://127.0.0.1:$PORT \
    --num-prompts "${NUM_PROMPTS:-$((C * 4))}" \
    --max-concurrency "$C" --random-input-len "${INPUT_LEN:-512}" \
    --random-output-len "${OUTPUT_LEN:-256}" \
    --vocab-min 100 --vocab-max 31000 --warmup 4 --seed 0 \
    --temperature "${TEMPERATURE:-0}" \
    ${EXTRA_JSON:+--extra-json "$EXTRA_JSON"} \
    --json "$OUT/bench_serve.json" | tee "$OUT/bench_serve.txt"
