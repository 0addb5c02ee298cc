#!/bin/sh
# Quantized tiny test models (t/quant.t, the GPU tests): each layout
# (fp8, compressed-tensors fp8 and int4, AWQ, GPTQ)
# libmoe loads (engine/model/quant.h), written by build/quantize with its
# dequantized f32 reference (<name>.ref), from models/localmoe-tiny (dim 64)
# a Qwen3-MoE with dim 128 and a dense layer (tools/make_tiny_model.py)
# whose sizes allow group 128 and 128x128 fp8 blocks, and a Mixtral with
# dim 256 whose experts fit the fp8 grouped GEMM's tiles (and a dim-1024
# bf16 layer for YAML fp8's threaded quantizer).  The list of names is
# written to OUT/MODELS.  Usage: tools/quant_models.sh [OUT] (build/quant).
set -eu
out=${1:-build/quant}
q=${QUANTIZE:-build/quantize}
mkdir -p "$out"
if [ ! -f "$out/base128/model.safetensors" ]; then
    python3 tools/make_tiny_model.py --arch qwen3moe --dim 128 --layers 2 \
        --heads 4 --kv-heads 2 --ffn 256 --moe-ffn 128 --experts 4 \
        --top-k 2 --mlp-only 1 --dtype bf16 --merges 100 --seed 7 \
        --out "$out/base128" > /dev/null
fi
if [ ! -f "$out/base256/model.safetensors" ]; then
    # Mixtral-like, sized for the fp8 grouped expert GEMM (N % 256, K %
    # 128 for gate|up and down: dim 256, expert ffn 128)
    python3 tools/make_tiny_model.py --arch mixtral --dim 256 --layers 2 \
        --heads 4 --kv-heads 2 --ffn 128 --experts 4 --top-k 2 \
        --dtype bf16 --merges 100 --seed 11 --out "$out/base256" > /dev/null
fi
if [ ! -f "$out/base1024/model.safetensors" ]; then
    # one layer of 1024 x 2048 expert matrices (2M weights: the YAML fp8
    # quantizer splits them over threads), for t/unit/quant.c only
    python3 tools/make_tiny_model.py --arch mixtral --dim 1024 --layers 1 \
        --heads 8 --kv-heads 2 --ffn 2048 --experts 2 --top-k 2 \
        --dtype bf16 --merges 100 --seed 13 --out "$out/base1024" > /dev/null
fi
tiny=models/localmoe-tiny
: > "$out/MODELS.tmp"
mk() {          # name base args...
    name=$1; base=$2; shift 2
    "$q" --in "$base" --out "$out/$name" --ref "$out/$name.ref" "$@"
    echo "$name" >> "$out/MODELS.tmp"
}
mk fp8-tensor        $tiny --format fp8-tensor
mk fp8-tensor-static $tiny --format fp8-tensor --static
mk fp8-block-32x16   $tiny --format fp8-block --block 32,16
mk ct-fp8-channel    $tiny --format ct-fp8
mk ct-fp8-ignore     $tiny --format ct-fp8 --ignore o_proj
mk awq-g32           $tiny --format awq --group 32
mk awq-g64           $tiny --format awq --group 64
mk awq-g32-ignore    $tiny --format awq --group 32 --ignore self_attn.o_proj
mk gptq-g32-sym      $tiny --format gptq --group 32 --sym
mk gptq-g64-asym-gidx $tiny --format gptq --group 64 --g-idx
mk gptq-g32-asym-act $tiny --format gptq --group 32 --desc-act
mk gptq-g64-sym-act  $tiny --format gptq --group 64 --sym --desc-act
mk ct-fp8-tensor     $tiny --format ct-fp8-tensor
mk fp8-block-128     "$out/base128" --format fp8-block --block 128,128
mk ct-fp8-block-128  "$out/base128" --format ct-fp8-block --block 128,128
mk ct-fp8-128        "$out/base128" --format ct-fp8 --static
mk ct-fp8-256        "$out/base256" --format ct-fp8
mk awq-g128          "$out/base128" --format awq --group 128
mk gptq-g128-sym-act "$out/base128" --format gptq --group 128 --sym --desc-act
mk gptq-g128-asym    "$out/base128" --format gptq --group 128
mk gptq-g128-256     "$out/base256" --format gptq --group 128
mk ct4-g32-sym       $tiny --format ct-int4 --group 32 --sym
mk ct4-g64-asym-ignore $tiny --format ct-int4 --group 64 --ignore o_proj
mk ct4-ch-asym       $tiny --format ct-int4 --group -1
mk ct4-g32-asym-act  $tiny --format ct-int4 --group 32 --desc-act
mk ct4-g128-sym-act  "$out/base128" --format ct-int4 --group 128 --sym --desc-act
mk ct4-g128-256      "$out/base256" --format ct-int4 --group 128
# with per-layer fp8 KV cache scales (loaded, unused by a bf16 cache;
# t/kv_fp8.t makes its own copies to test them)
mk fp8-tensor-kv     $tiny --format fp8-tensor --kv-scales 0.5,0.25
# malformed copies for the refusal tests (no reference)
"$q" --in $tiny --out "$out/bad-fp8-noscale" --format fp8-tensor --corrupt drop-scale
"$q" --in $tiny --out "$out/bad-awq-noscale" --format awq --group 32 --corrupt drop-scale
"$q" --in $tiny --out "$out/bad-gptq-gidx" --format gptq --group 32 --desc-act --corrupt gidx-range
"$q" --in $tiny --out "$out/bad-awq-scaleshape" --format awq --group 32 --corrupt scale-shape
"$q" --in $tiny --out "$out/bad-ct4-noscale" --format ct-int4 --group 32 --corrupt drop-scale
"$q" --in $tiny --out "$out/bad-ct4-gidx" --format ct-int4 --group 32 --desc-act --corrupt gidx-range
"$q" --in $tiny --out "$out/bad-ct4-shape" --format ct-int4 --group 32 --sym --corrupt wshape
mv "$out/MODELS.tmp" "$out/MODELS"
