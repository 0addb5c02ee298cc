#!/usr/bin/env bash
# On the GPU machine: stall-free batching A/B (issue 12 item 6).  Serves the
# Mixtral-8x7B shape (load_format dummy, max_model_len 16384) through nginx
# twice, engine.prefill_step_ratio 0 (off: every prompt prefilled whole,
# as before) and 3 (the default), and drives each with bench/serve: 16
# streams, INPUT_LEN (default 8192) prompt tokens, 128 output tokens, so
# prompts keep arriving beside running streams.  Prints TTFT and TPOT
# (median, p99) for both; logs and JSON under $OUT/stallfree-*.
#   bench/stallfree.sh [RATIOS...]      (default: 0 3)
set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh
RATIOS=("$@")
[ ${#RATIOS[@]} -gt 0 ] || RATIOS=(0 3)
PORT=8010
C=${C:-16}
mkdir -p build/run "$OUT"
trap 'gpu_nginx_stop' EXIT
gpu_bench_tokenizer || exit 1
[ -x build/bench/serve ] || { echo "build/bench/serve missing: make bench" >&2; exit 1; }
rc=0
for r in "${RATIOS[@]}"; do
    y=$PWD/build/run/stallfree-$r.yaml
    c=$PWD/build/run/stallfree-$r.conf
    log=build/run/stallfree-$r-error.log
    cat > "$y" <<YAML
vllm:
  model_name: "$PWD/bench/models/mixtral-8x7b"
  served_model_name: "mixtral-8x7b"
  max_model_len: 16384
  block_size: 16
  max_num_seqs: 64
  max_num_batched_tokens: 8192
  gpu_memory_utilization: 0.92
  load_format: "dummy"
engine:
  backend: cuda
  prefill_step_ratio: $r
YAML
    sed -e "s#moe_engine .*#moe_engine $y;#" \
        -e "s#127.0.0.1:8000#127.0.0.1:$PORT#" \
        -e "s#build/run/bench-nginx.pid#build/run/stallfree-nginx.pid#" \
        bench/conf/nginx-bench.conf > "$c"
    : > $log
    gpu_nginx_start "$c" $PORT $log || { rc=1; continue; }
    if ! gpu_wait_health $PORT 240 $log; then
        tail -20 $log; gpu_nginx_stop; rc=1; continue
    fi
    echo "=== prefill_step_ratio $r: $C streams, ${INPUT_LEN:-8192} prompt tokens, 128 out"
    build/bench/serve --base-url http://127.0.0.1:$PORT \
        --num-prompts "${NUM_PROMPTS:-$((C * 3))}" --max-concurrency "$C" \
        --random-input-len "${INPUT_LEN:-8192}" --random-output-len 128 \
        --vocab-min 100 --vocab-max 31000 --warmup 2 --seed 0 \
        --json "$OUT/stallfree-$r.json" | tee "$OUT/stallfree-$r.txt" || rc=1
    curl_stats=$(python3 - "$PORT" <<'PY'
import json, sys, urllib.request
u = "http://127.0.0.1:%s/v1/stats/performance" % sys.argv[1]
try:
    print(json.dumps(json.load(urllib.request.urlopen(u, timeout=5)).get("stall_free")))
except Exception as e:
    print("stats: %s" % e)
PY
)
    echo "stall_free stats: $curl_stats"
    gpu_nginx_stop
    cp $log "$OUT/stallfree-$r-error.log" 2>/dev/null
done
exit $rc
