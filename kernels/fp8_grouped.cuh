/*
 * The tile decode and the bf16 epilogue of the grouped e4m3 GEMMs on
 * wgmma (kernels/fp8_grouped.cu; bench/dev/wg_ggemm's variants): device
 * code, include after common.cuh.
 */
#ifndef MOE_KERNELS_FP8_GROUPED_CUH
#define MOE_KERNELS_FP8_GROUPED_CUH

#define FG_BM     128                   /* rows of a tile */

/* A CTA's tile from its index bid over (group, column tile of ntn, row
 * tile): its group e, column tile nt, first row r0 (from offs[0]) and
 * rows mrows.  0 when bid is past the last tile.  SPAN 2 (fp8_grouped.cu's
 * CTA pairs): bid indexes pairs of row tiles, and the CTA of rank `rank`
 * takes row tile 2 mp + rank of the pair; a rank past the group's last
 * row tile gets mrows 0 (it loads and multiplies rows it does not
 * store). */
struct fg_tile_t {
    int e, nt, r0, mrows;
};

template <int SPAN = 1>
__device__ __forceinline__ int
fg_tile(const int32_t *offs, int E, int ntn, int bid, fg_tile_t *t,
    int rank = 0)
{
    int base = offs[0], lo = base;

    for (int e = 0; e < E; e++) {
        int hi = offs[e + 1], rows = hi - lo;
        int mtiles = (rows + FG_BM - 1) / FG_BM;

        if (SPAN > 1) {
            mtiles = (mtiles + SPAN - 1) / SPAN;
        }
        if (bid < mtiles * ntn) {
            int mt = SPAN * (bid % mtiles) + rank;

            t->e = e;
            t->nt = bid / mtiles;
            t->r0 = lo - base + mt * FG_BM;
            t->mrows = min(FG_BM, rows - mt * FG_BM);
            if (SPAN > 1) {
                t->mrows = max(0, t->mrows);
            }
            return 1;
        }
        bid -= mtiles * ntn;
        lo = hi;
    }
    return 0;
}


/* A consumer warpgroup's accumulators d[h] (NH halves of 128 columns:
 * d[h][4 j + c + 2 v] is row 64 wg + 16 warp + lane / 4 + 8 v of the
 * tile, column c0 + 128 h + 8 j + 2 (lane % 4) + c) as bf16 into Y, leading
 * dimension N; rows past mrows are not stored. */
template <int NH>
__device__ __forceinline__ void
fg_store(float (*d)[64], int wg, const fg_tile_t *t, int N, int c0,
    __nv_bfloat16 *Y)
{
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
    const int ra = 64 * wg + 16 * w + (lane >> 2);

#pragma unroll
    for (int v = 0; v < 2; v++) {
        const int r = ra + 8 * v;

        if (r < t->mrows) {
            __nv_bfloat16 *y = Y + (size_t) (t->r0 + r) * N + c0
                               + 2 * (lane & 3);

#pragma unroll
            for (int h = 0; h < NH; h++) {
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    *reinterpret_cast<__nv_bfloat162 *>(y + 128 * h + 8 * j)
                        = __floats2bfloat162_rn(d[h][4 * j + 2 * v],
                                                d[h][4 * j + 2 * v + 1]);
                }
            }
        }
    }
}

#endif /* MOE_KERNELS_FP8_GROUPED_CUH */
