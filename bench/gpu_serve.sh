#!/usr/bin/env bash
# On the GPU machine: serve the Mixtral-8x7B shape (load_format dummy)
# through nginx and drive it with bench/serve at fixed concurrency, next to
# bench_engine's decode figure at the same batch.
#   bench/gpu_serve.sh [CONCURRENCY] [NGINX]
# Environment: INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS, TEMPERATURE (default 0:
# greedy; > 0: tokens drawn on the GPU).
set -u
cd "$(dirname "$0")/.." || exit 2
C=${1:-64}
NGINX=${2:-.dev/nginx}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p build/run "$OUT"
[ -d .dev/lib ] && export LD_LIBRARY_PATH=$PWD/.dev/lib
cp build/tok/llama2/tokenizer.json bench/models/mixtral-8x7b/tokenizer.json
"$NGINX" -p "$PWD/" -c bench/conf/nginx-bench.conf -e build/run/bench-error.log &
for i in $(seq 1 120); do
    python3 -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8000/health',timeout=2)" 2>/dev/null && break
    sleep 1
done
grep 'moe:' build/run/bench-error.log | tail -3
build/bench/serve --base-url http://127.0.0.1:8000 --num-prompts "${NUM_PROMPTS:-$((C * 4))}" \
    --max-concurrency "$C" --random-input-len "${INPUT_LEN:-512}" \
    --random-output-len "${OUTPUT_LEN:-256}" \
    --vocab-min 100 --vocab-max 31000 --warmup 4 --seed 0 \
    --temperature "${TEMPERATURE:-0}" \
    --json "$OUT/bench_serve.json" | tee "$OUT/bench_serve.txt"
# wait for the master: it exits after its worker freed the GPU (run 9 found
# a worker of the previous run still holding the weights 2 s after kill)
kill %1 2>/dev/null; wait %1 2>/dev/null
cp build/run/bench-error.log "$OUT/bench_serve_error.log" 2>/dev/null
