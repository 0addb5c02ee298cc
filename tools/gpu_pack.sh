#!/usr/bin/env bash
# Packs what a GPU run needs into one xz archive, .carry/bundle.txz (an
# ignored folder), for the device tool's carry list: the GPU test and bench
# binaries (build/gpu, build/bench), the nginx module, build/moe,
# build/quantize, the A/B variants of tools/gpu_ab.sh (build/ab) and the
# bundle of libraries and nginx (.dev, make gpu-bundle).  The binaries each hold the kernels' device code, so they
# are large alone (about 60 MB together) and nearly identical: xz's window
# shrinks them to a few MB, under the device tool's 64 MiB per call.
# On the device, from the repository root:  tar xJf .carry/bundle.txz
#   tools/gpu_pack.sh            (after make all gpu bench-dev gpu-bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
list=()
for f in build/gpu/* build/bench/serve build/bench/dev/* build/ab/*/* \
         build/nginx/objs/ngx_http_moe_module.so build/moe build/quantize; do
    [ -f "$f" ] && { [ -x "$f" ] || [ "${f##*/}" = COMMIT ]; } && list+=("$f")
done
[ -d .dev ] && list+=(.dev)
mkdir -p .carry
tar cJf .carry/bundle.txz "${list[@]}"
ls -la .carry/bundle.txz
