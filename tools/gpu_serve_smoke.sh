#!/usr/bin/env bash
# On a GPU machine: serve conf/nginx.conf (backend auto -> cuda) with a
# carried nginx binary and make a few OpenAI requests through it.
#   tools/gpu_serve_smoke.sh [NGINX_BINARY]
set -u
cd "$(dirname "$0")/.." || exit 2
NGINX=${1:-.dev/nginx}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p build/run/logs build/run/tmp "$OUT"
"$NGINX" -p "$PWD/" -c conf/nginx.conf -e build/run/error.log &
sleep 1
python3 - <<'PY'
import json, time, urllib.request
base = "http://127.0.0.1:8000"
def post(path, body, stream=False):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)
for i in range(60):
    try:
        urllib.request.urlopen(base + "/health", timeout=2).read(); break
    except Exception:
        time.sleep(0.5)
print("health:", urllib.request.urlopen(base + "/health").read().decode())
r = json.load(post("/v1/chat/completions", {"messages": [{"role": "user",
    "content": "Who made the heaven and the earth?"}], "max_tokens": 40,
    "temperature": 0}))
print("chat:", r["choices"][0]["message"]["content"], r["usage"])
t0 = time.time(); n = 0
with post("/v1/completions", {"prompt": "In the beginning", "max_tokens": 64,
          "temperature": 0, "stream": True}) as s:
    for line in s:
        if line.startswith(b"data: {"): n += 1
print("stream events:", n, "in %.3f s" % (time.time() - t0))
PY
grep -E 'moe:' build/run/error.log | head -20
kill %1 2>/dev/null; sleep 1
cp build/run/error.log "$OUT/serve_error.log" 2>/dev/null
