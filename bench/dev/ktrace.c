/*
 * A kernel timeline for any CUDA program, without Nsight Systems (the
 * device has none): LD_PRELOAD=build/bench/dev/libktrace.so KTRACE_OUT=f
 * CMD records every kernel and memcpy through CUPTI's activity API
 * (CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, which keeps launches concurrent)
 * and writes one line per activity at exit:
 *   K <start ns> <end ns> <stream> <name>
 *   M <start ns> <end ns> <stream> <bytes> <copy kind>
 * tools/ktrace_gaps.py turns that into per-step kernel time, idle gaps
 * and where they fall.  A measuring tool only: nothing ships with it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cupti.h>

#define KT_BUF (8u << 20)

static FILE *kt_out;


static void CUPTIAPI
kt_buffer_requested(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = NULL;
    if (posix_memalign((void **) buf, 8, KT_BUF) != 0) {
        *buf = NULL;
    }
    *size = *buf != NULL ? KT_BUF : 0;
    *max_records = 0;
}


static void CUPTIAPI
kt_buffer_completed(CUcontext ctx, uint32_t stream_id, uint8_t *buf,
    size_t size, size_t valid)
{
    CUpti_Activity *rec = NULL;

    (void) ctx;
    (void) stream_id;
    (void) size;
    while (kt_out != NULL
           && cuptiActivityGetNextRecord(buf, valid, &rec)
              == CUPTI_SUCCESS)
    {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL
            || rec->kind == CUPTI_ACTIVITY_KIND_KERNEL)
        {
            const CUpti_ActivityKernel10 *k =
                (const CUpti_ActivityKernel10 *) rec;

            fprintf(kt_out, "K %llu %llu %u %s\n",
                    (unsigned long long) k->start,
                    (unsigned long long) k->end, (unsigned) k->streamId,
                    k->name != NULL ? k->name : "?");
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m =
                (const CUpti_ActivityMemcpy6 *) rec;

            fprintf(kt_out, "M %llu %llu %u %llu %u\n",
                    (unsigned long long) m->start,
                    (unsigned long long) m->end, (unsigned) m->streamId,
                    (unsigned long long) m->bytes, (unsigned) m->copyKind);
        }
    }
    free(buf);
}


static void
kt_flush(void)
{
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (kt_out != NULL) {
        fclose(kt_out);
        kt_out = NULL;
    }
}


__attribute__((constructor)) static void
kt_init(void)
{
    const char *path = getenv("KTRACE_OUT");

    kt_out = fopen(path != NULL ? path : "ktrace.txt", "w");
    if (kt_out == NULL) {
        return;
    }
    if (cuptiActivityRegisterCallbacks(kt_buffer_requested,
                                       kt_buffer_completed) != CUPTI_SUCCESS
        || cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
           != CUPTI_SUCCESS
        || cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS)
    {
        fprintf(stderr, "ktrace: CUPTI refused the activity kinds\n");
        fclose(kt_out);
        kt_out = NULL;
        return;
    }
    atexit(kt_flush);
}
