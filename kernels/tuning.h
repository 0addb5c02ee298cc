/*
 * The CUDA tuning record: every knob that chooses among the shipped
 * kernel paths, with its default, in one plain C struct.
 *
 * The CUDA backend fills one record when it is created (defaults, then the
 * MOE_CUDA_* environment overrides, range-checked, in
 * engine/backends/cuda_tuning.c), logs it in one line, and hands it to the
 * launchers that read a knob (moe_cuda_gemv, moe_cuda_attention).  Nothing
 * in kernels/ reads the environment.  A launcher given NULL uses the
 * defaults below.  What each knob trades and how its default was measured:
 * kernels/TUNING.md.
 */
#ifndef MOE_KERNELS_TUNING_H
#define MOE_KERNELS_TUNING_H

typedef struct {
    /* backend: step shapes -> paths */
    int graphs;          /* MOE_CUDA_GRAPHS 0|1: replay decode steps as
                            CUDA graphs (default 1) */
    int sample_tokens;   /* MOE_CUDA_SAMPLE_TOKENS 0|1: draw non-greedy
                            tokens on the device (default 1) */
    int gemv_max_t;      /* MOE_CUDA_GEMV_MAX_T >= 0: MoE steps of up to
                            this many tokens take the grouped GEMV;
                            MOE_CUDA_TUNING_AUTO (default): 128 for dense
                            models, 32 for <= 16 experts, 256 above */
    int dense_gemv_t;    /* MOE_CUDA_DENSE_GEMV_T >= 0: dense GEMMs (qkv,
                            o, lm_head, dense MLP) of up to this many rows
                            take the GEMV, cuBLAS above (default 16) */
    int ggemm_max_t;     /* MOE_CUDA_GGEMM_MAX_T >= 0: MoE steps above
                            gemv_max_t and up to this take the grouped
                            tensor-core GEMM, per-expert cuBLAS above
                            (default 64) */
    /* launchers */
    int gemv_fma_rows;   /* MOE_CUDA_GEMV_FMA 0..4: GEMV groups of up to
                            this many rows per pass take the CUDA-core
                            kernel, more the tensor-core one (default 2;
                            0: tensor cores only) */
    int att_split_bps;   /* MOE_CUDA_ATT_BPS 1..64: decode attention
                            (split kernel) grid sized for this many blocks
                            per SM (default 2) */
    /* long contexts (split-K decode attention; kernels/TUNING.md) */
    int att_long_ctx;    /* MOE_CUDA_ATT_LONG_CTX >= 0: steps whose longest
                            context reaches this take att_long_bps
                            (default 4096; 0: never) */
    int att_long_bps;    /* MOE_CUDA_ATT_LONG_BPS 1..64: decode attention
                            grid blocks per SM at long contexts
                            (default 2: the tensor-core kernel's two
                            resident blocks; H100 run 21c, batch 1 at
                            8k / 32k 7-8 % faster than 3) */
    int att_decode_tc;   /* MOE_CUDA_ATT_DECODE_TC 0|1: decode attention
                            (the key-split path) on tensor cores for head
                            dims 64 and 128 (default 1; 0: the SIMT
                            kernel, for A/B runs) */
    int pdl;             /* MOE_CUDA_PDL 0|1: launch the kernels with
                            programmatic dependent launch, so each one's
                            blocks are scheduled while the one before it
                            finishes (default 1; process-wide, see
                            moe_cuda_pdl_set) */
    /* decode overlap (kernels/TUNING.md) */
    int fuse_unpermute;  /* MOE_CUDA_FUSE_UNPERMUTE 0|1: the weighted
                            un-permute runs inside the next norm's launch
                            (moe_cuda_unpermute_rmsnorm) where nothing
                            else reads the sum (default 1) */
    /* fp8 prefill */
    int fold_scales;     /* MOE_CUDA_FOLD_SCALES 0|1: the fp8 tensor-core
                            projections' scales applied by their readers
                            (rope, the next norm, the un-permute) instead
                            of a rescale pass each (default 1; 0 for A/B
                            runs) */
    int fp8_grouped;     /* MOE_CUDA_FP8_GROUPED 0..2: the fp8 prefill's
                            expert GEMMs as one grouped launch each
                            (kernels/fp8_grouped.h: offsets on the device,
                            no host sync per layer) where the shapes allow
                            (default 1: then the separate SwiGLU +
                            quantization pass; 2: SwiGLU in the gate|up
                            GEMM's epilogue, h quantized after it; 0:
                            per-expert cuBLASLt calls) */
    /* 4-bit weights */
    int q4_layout;       /* MOE_CUDA_Q4_LAYOUT 0..3: how 4-bit weights are
                            kept on the device.  1 (default): AWQ repacked
                            at load into GPTQ's layout (its tensor-core
                            GEMV is the faster one), GPTQ as stored; 0: the
                            checkpoints' layouts; 2: both repacked into the
                            tiled layout (kernels/quant_gemv.h "Tiled
                            4-bit weights"; measured slower, for
                            development) with SiLU fused into the gate|up
                            GEMV; 3: tiled, SiLU a separate pass */
    int q4_gemv;         /* MOE_CUDA_Q4_GEMV 0|1: 4-bit weights in GPTQ's
                            layout (q4_layout 0 / 1, no g_idx), row hints
                            up to 16: 1 (default) the GEMV by
                            quantization group (kernels/q4_group.cu, SiLU
                            fused into gate|up), 0 the tensor-core GEMV of
                            quant_gemv.cu + the SiLU pass (for A/B runs) */
    /* fp8 weights */
    int fp8_gemv;        /* MOE_CUDA_FP8_GEMV 0|1: e4m3 GEMV launches with
                            row hints up to 2 (decode batch 1-2): 1
                            (default) f16 fragments, each pass's rows
                            staged in shared memory (kernel_gemv_fp8h),
                            0 bf16 fragments (kernel_gemv_fp8, for A/B
                            runs) */
    int fp8_ggemm;       /* MOE_CUDA_FP8_GGEMM 0|1: the decode steps' e4m3
                            grouped GEMM (ggemm path): 1 (default) f16
                            fragments, the tokens first made f16 rows with
                            per-row scales (moe_cuda_rows_f16 +
                            moe_cuda_ggemm_fp8h), 0 bf16 fragments (for
                            A/B runs) */
    /* prefill attention */
    int att_prefill_wg;  /* MOE_CUDA_ATT_PREFILL_WG 0|1: prefill attention
                            (bf16 cache, head dims 64 / 128) on warpgroup
                            tensor cores (kernel_attention_prefill_wg,
                            wgmma): 1 (default), 0 the FA2-style mma.sync
                            kernel (kernel_attention_prefill_tc, for A/B
                            runs) */
    int att_prefill_wg8; /* MOE_CUDA_ATT_PREFILL_WG8 0|1: prefill attention
                            over an fp8 (e4m3) cache on the warpgroup
                            kernel with f16 operands
                            (kernel_attention_prefill_wg8): 1 (default,
                            device run 19a); 0 the SIMT kernel */
    int fp8_gsched;      /* MOE_CUDA_FP8_GSCHED 0..2: how the grouped fp8
                            expert GEMMs (fp8_grouped 1 or 2) share their
                            tiles among the SMs (kernels/fp8_grouped.h):
                            1 (default) each CTA draws its next tile from
                            a counter (MOE_FG_DYN; H100, 2026-12-05:
                            prefill 2048 68.0 -> 65.9 ms), 0 the static
                            order, 2 drawn tiles on CTA pairs sharing
                            their weight loads (MOE_FG_PAIR; measured
                            slower, run 21a: for A/B only) */
    int fp8_dgrouped;    /* MOE_CUDA_FP8_DGROUPED 0|1: decode steps above
                            gemv_max_t up to ggemm_max_t with e4m3
                            experts whose every routed layer fits the
                            fused fp8 FFN on the grouped e4m3 GEMM
                            (activations quantized per row, as prefill
                            and the dense projections above dense_gemv_t
                            do) take it instead of the f16 grouped GEMM:
                            1 (default; H100 run 21c, batch 32 / 64
                            +5 % / +7.5 %), 0 the f16 grouped GEMM */
    int route_fuse1;     /* MOE_CUDA_ROUTE_FUSE1 0..2: a one-token step's
                            FFN norm, router, top-k and permutation in
                            one launch (moe_cuda_norm_route1) instead of
                            the norm's launch and the router's two: 1
                            with the router rows in registers (64 a
                            thread: a whole SM), 2 the lean kernel (32
                            registers, router via L2); 0 the three
                            launches.  Default MOE_CUDA_TUNING_AUTO: 2
                            for 4-bit experts, else 0 (H100 runs 22b-22d:
                            GPTQ batch 1 +1.4 %, fp8 -1.7 %) */
    int att_early;       /* MOE_CUDA_ATT_EARLY 0|1: a one-token step's
                            decode attention (tensor-core kernel) reads
                            its positions, block table and the keys
                            before its own position before the PDL wait
                            (they are earlier steps' writes), the q rows
                            and its own key after: 1 (default; H100 runs
                            22c / 22d, fp8 batch 1 +1.2 %), 0 all after */
    int dense_pre;       /* MOE_CUDA_DENSE_PRE 0|1: a dense projection's
                            GEMV of one pass (fp8 on f16 fragments, 4-bit
                            by quantization group) loads both register
                            stages of its weights before its PDL wait
                            (and asks the next chunks into L2), so they
                            stream while the kernel before (attention,
                            the FFN's un-permute + norm) runs: 1, or 0
                            (only the first chunks asked into L2 there).
                            Default MOE_CUDA_TUNING_AUTO: 1 for 4-bit
                            experts (their dense projections are 4-bit
                            too), else 0 (H100 run 23b, batch 1: GPTQ
                            +1.2 %, AWQ +1.6 %, fp8 -0.8 %) */
} moe_cuda_tuning_t;

#define MOE_CUDA_TUNING_AUTO  (-1)

/* The defaults, as an initializer (field order above). */
#define MOE_CUDA_TUNING_DEFAULTS                                             \
    { 1, 1, MOE_CUDA_TUNING_AUTO, 16, 64, 2, 2, 4096, 2, 1, 1, 1, 1, 1, 1, 1, \
      1, 1, 1, 1, 1, 1, MOE_CUDA_TUNING_AUTO, 1, MOE_CUDA_TUNING_AUTO }

#endif /* MOE_KERNELS_TUNING_H */
