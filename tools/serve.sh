#!/usr/bin/env bash
# Serve conf/nginx.conf (the embedded default model) on 127.0.0.1:8000 in the
# foreground, with its runtime files under build/run/.  Ctrl-C stops it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/build/run/logs" "$root/build/run/tmp"
nginx="${NGINX:-/usr/sbin/nginx}"
"$nginx" -p "$root/" -c conf/nginx.conf -t
echo "LocalMoE: serving on http://127.0.0.1:8000 (Ctrl-C to stop)"
exec "$nginx" -p "$root/" -c conf/nginx.conf -g 'daemon off;'
