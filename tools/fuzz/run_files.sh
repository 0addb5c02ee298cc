#!/bin/sh
# Run one file-side harness (tools/fuzz/FILES.md) as a single fuzzer
# process: tools/fuzz/run_files.sh NAME [SECONDS] [libFuzzer args...]
# NAME: safetensors, config, quant, tokenizer_json or yaml (build them with
# make -j2 MOE_CUDA=0 fuzz-files).  New inputs go to build/fuzz/work/NAME,
# crashes to build/fuzz/artifacts/NAME/, the log to
# build/fuzz/logs/NAME/fuzz-0.log.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 NAME [SECONDS] [args...]" >&2; exit 2; }
name=$1
secs=${2:-600}
[ $# -ge 2 ] && shift 2 || shift 1
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/build/fuzz/fuzz_$name
[ -x "$bin" ] || { echo "$bin missing: make MOE_CUDA=0 fuzz-files" >&2; exit 1; }
mkdir -p "$root/build/fuzz/work/$name" "$root/build/fuzz/artifacts/$name" \
         "$root/build/fuzz/logs/$name"
dict=
[ -f "$root/tools/fuzz/dict/$name.dict" ] \
    && dict=-dict=$root/tools/fuzz/dict/$name.dict
cd "$root/build/fuzz/logs/$name"      # -jobs writes fuzz-0.log here
status=0
"$bin" "$root/build/fuzz/work/$name" "$root/tools/fuzz/corpus/$name" $dict \
    -jobs=1 -workers=1 -max_total_time="$secs" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -artifact_prefix="$root/build/fuzz/artifacts/$name/" \
    -print_final_stats=1 "$@" || status=$?
grep -E '^#[0-9]+' fuzz-0.log | tail -1 || :
exit $status
