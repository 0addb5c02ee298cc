#!/usr/bin/env bash
# On a GPU machine: serve conf/nginx.conf (the embedded default model,
# backend auto -> cuda) with the bundle's nginx (make gpu-bundle; carry .dev)
# and make a few OpenAI requests through it; the server is stopped (by pid)
# before the script exits, whatever happens.
#   tools/gpu_serve_smoke.sh [NGINX_BINARY]
# Logs: $OUT/serve_smoke_error.log (nginx's error log).  Exit status 0 when
# every request answered as expected.
set -u
cd "$(dirname "$0")/.." || exit 2
[ $# -ge 1 ] && NGINX=$1
. tools/gpu_env.sh

PORT=8000                           # conf/nginx.conf's listen
mkdir -p build/run
: > build/run/error.log             # conf/nginx.conf's error_log
save_log() { cp build/run/error.log "$OUT/serve_smoke_error.log" 2>/dev/null; }
trap 'gpu_nginx_stop; save_log' EXIT

gpu_nginx_start conf/nginx.conf $PORT build/run/error.log || exit 1
gpu_wait_health $PORT 120 build/run/error.log || { tail -20 build/run/error.log; exit 1; }

python3 - "$PORT" <<'PY'
import json, sys, time, urllib.request
base = "http://127.0.0.1:%s" % sys.argv[1]
def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)
print("health:", urllib.request.urlopen(base + "/health").read().decode())
r = json.load(post("/v1/chat/completions", {"messages": [{"role": "user",
    "content": "Who made the heaven and the earth?"}], "max_tokens": 40,
    "temperature": 0}))
print("chat:", r["choices"][0]["message"]["content"], r["usage"])
assert r["usage"]["completion_tokens"] > 0, "no completion tokens"
t0 = time.time(); n = 0; done = False
with post("/v1/completions", {"prompt": "In the beginning", "max_tokens": 64,
          "temperature": 0, "stream": True}) as s:
    for line in s:
        if line.startswith(b"data: {"): n += 1
        if line.startswith(b"data: [DONE]"): done = True
print("stream events:", n, "in %.3f s" % (time.time() - t0), "[DONE]" if done else "no [DONE]")
assert n > 0 and done, "stream incomplete"
PY
rc=$?
grep -E 'moe:' build/run/error.log | head -20
exit $rc
