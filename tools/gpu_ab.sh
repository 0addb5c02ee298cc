#!/usr/bin/env bash
# A/B of kernel candidates kept on branches, in one device call.
#
# Here (no GPU needed), after `make all gpu bench-dev gpu-bundle`:
#   tools/gpu_ab.sh build NAME=BRANCH[:TEST,TEST...] [...]
#     builds bench_engine and the variant's tests (the TESTs named, else
#     AB_TESTS: default test_fp8mma) of each branch in a git worktree
#     (/tmp/ab-NAME) seeded with this tree's build/, so only what the
#     branch changes is recompiled, into build/ab/NAME/ (with the branch's
#     commit in build/ab/NAME/COMMIT); then tools/gpu_pack.sh packs them
#     with the rest (xz: the variants cost little next to main's).
#   tools/gpu_ab.sh list     the variants built, and their commits
#
# On the device, after `tar xJf .carry/bundle.txz && . tools/gpu_env.sh`:
#   tools/gpu_ab.sh run
#     every variant's tests first (the test binaries in build/ab/NAME; main
#     runs each test some variant has; a variant whose test fails is not
#     timed; MOE_TEST_QUICK=1 in the environment shortens test_kernels),
#     then AB_ROUNDS (default 2) rounds of the
#     benchmark, main and the variants in turn in each round (drift and
#     clocks hit them alike); logs under $OUT/ab/, and $OUT/ab/summary.txt:
#     each variant's median tok/s and share of the limit per batch, from the
#     benchmark's RESULT lines, next to main's.  AB_BENCH is the benchmark's
#     arguments after the binary (default: the fp8 decode batches of
#     kernels/NOTES.md), AB_ENV the environment it runs under.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
AB_TESTS=${AB_TESTS:-"test_fp8mma"}
AB_ROUNDS=${AB_ROUNDS:-2}
AB_BENCH=${AB_BENCH:-"mixtral-8x7b --weights fp8"}
AB_ENV=${AB_ENV:-"BENCH_BATCHES=1,8,32,64 BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_PROMPTS=0"}

die() { echo "gpu_ab: $*" >&2; exit 2; }

ab_build() {
    [ $# -gt 0 ] || die "build: NAME=BRANCH expected"
    [ -f build/libmoe.a ] || die "build main first (make all gpu bench-dev)"
    for spec in "$@"; do
        name=${spec%%=*}
        br=${spec#*=}
        tests=$AB_TESTS
        case $br in *:*) tests=$(echo "${br#*:}" | tr , ' '); br=${br%%:*};; esac
        [ -n "$name" ] && [ "$name" != "$spec" ] \
            || die "'$spec': NAME=BRANCH expected"
        case $name in *[!A-Za-z0-9_.-]*) die "'$name': letters, digits, _ . - only";; esac
        git rev-parse --verify -q "$br^{commit}" > /dev/null \
            || die "no branch or commit '$br'"
        wt=/tmp/ab-$name
        git worktree remove --force "$wt" 2> /dev/null || rm -rf "$wt"
        git worktree add -q --detach "$wt" "$br"
        # the worktree's sources are older than the copied build, except
        # what the branch changes against this tree (touched after it)
        mkdir -p "$wt/build"
        for f in build/*; do
            case ${f#build/} in
            ab|asan|fuzz|npm|npm-sdk|nginx|quant|run|t|tok) ;;
            *) cp -a "$f" "$wt/build/" ;;
            esac
        done
        [ -e .dev ] && ln -s "$ROOT/.dev" "$wt/.dev"
        find "$wt/build" -exec touch {} +
        sleep 1
        changed=$(git diff --name-only HEAD "$br" --)
        for f in $changed; do
            [ -e "$wt/$f" ] && touch "$wt/$f"
        done
        targets=""
        for b in bench_engine $tests; do
            targets="$targets build/gpu/$b"
        done
        echo "gpu_ab: $name = $br ($(git rev-parse --short "$br")): changed:" $changed
        make -C "$wt" $targets > "/tmp/ab-$name.log" 2>&1 \
            || { tail -30 "/tmp/ab-$name.log"; die "$name: build failed (/tmp/ab-$name.log)"; }
        mkdir -p "build/ab/$name"
        for b in bench_engine $tests; do
            cp "$wt/build/gpu/$b" "build/ab/$name/$b"
        done
        git rev-parse "$br" > "build/ab/$name/COMMIT"
        git worktree remove --force "$wt"
    done
    tools/gpu_pack.sh
}

ab_list() {
    for d in build/ab/*/; do
        [ -f "$d/COMMIT" ] || continue
        echo "$(basename "$d") $(cat "$d/COMMIT")" $(ls "$d" | grep -v COMMIT)
    done
}

# the median of the numbers on stdin
median() { sort -g | awk '{v[NR]=$1} END {if (NR) print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

ab_run() {
    out=${OUT:-/tmp/ab-out}/ab
    mkdir -p "$out"
    variants="main"
    for d in build/ab/*/; do
        [ -f "$d/COMMIT" ] && variants="$variants $(basename "$d")"
    done
    bindir() { [ "$1" = main ] && echo build/gpu || echo "build/ab/$1"; }
    vtests() {      # the tests of variant $1 (main: every variant's)
        if [ "$1" = main ]; then
            for d in build/ab/*/; do ls "$d"; done | grep '^test_' | sort -u
        else
            ls "build/ab/$1" | grep '^test_'
        fi
    }
    timed="main"
    for v in $variants; do
        ok=1
        for t in $(vtests "$v"); do
            bin=$(bindir "$v")/$t
            if "$bin" > "$out/$v.$t.log" 2>&1; then
                echo "$v $t: $(grep -c '^ok' "$out/$v.$t.log") ok"
            else
                echo "$v $t: FAILED ($(grep -c '^not ok' "$out/$v.$t.log") not ok; $out/$v.$t.log)"
                ok=0
            fi
        done
        [ "$v" != main ] && [ $ok = 1 ] && timed="$timed $v"
    done
    for r in $(seq 1 "$AB_ROUNDS"); do
        for v in $timed; do
            bin=$(bindir "$v")/bench_engine
            [ -x "$bin" ] || bin=build/gpu/bench_engine
            env $AB_ENV "$bin" $AB_BENCH > "$out/$v.bench.$r.log" 2>&1 \
                || echo "$v round $r: bench rc $?"
        done
    done
    {
        echo "A/B: $AB_ENV bench_engine $AB_BENCH, $AB_ROUNDS rounds (median)"
        printf "%-16s %6s %10s %8s %s\n" variant batch tok/s "of lim" "vs main"
        batches=$(cat "$out"/main.bench.*.log 2> /dev/null | grep '^RESULT' \
                  | grep -o 'kind=decode batch=[0-9]*' | grep -o '[0-9]*$' | sort -n | uniq)
        for v in $timed; do
            for bt in $batches; do
                sel() { cat "$out/$1".bench.*.log 2> /dev/null \
                        | grep "^RESULT .*kind=decode batch=$bt " \
                        | grep -o "$2=[0-9.]*" | cut -d= -f2 | median; }
                ts=$(sel "$v" tok_s); ol=$(sel "$v" of_limit)
                tm=$(sel main tok_s)
                rel=$(awk -v a="$ts" -v b="$tm" 'BEGIN {if (a != "" && b > 0) printf "%+.1f %%", 100 * (a / b - 1)}')
                [ -n "$ts" ] && ts=$(printf "%.1f" "$ts")
                printf "%-16s %6s %10s %8s %s\n" "$v" "$bt" "${ts:--}" "${ol:--}" "$rel"
            done
        done
    } | tee "$out/summary.txt"
}

case ${1:-} in
build) shift; ab_build "$@" ;;
list) ab_list ;;
run) ab_run ;;
*) die "usage: tools/gpu_ab.sh build NAME=BRANCH... | list | run" ;;
esac
