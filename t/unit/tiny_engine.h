/*
 * The unit tests' engine on the tiny test model: moe_config_defaults plus
 * models/localmoe-tiny under srcdir on the cpu backend, one thread, 128
 * positions in blocks of 4, 64 KV blocks, 8 sequences.  A test changes
 * what it needs after tu_tiny_config, then calls tu_engine.
 */
#ifndef MOE_T_TINY_ENGINE_H
#define MOE_T_TINY_ENGINE_H

#include <stdio.h>

#include "moe.h"
#include "tap.h"

static inline void
tu_tiny_config(moe_config_t *cfg, const char *srcdir)
{
    moe_config_defaults(cfg);
    snprintf(cfg->model_name, sizeof(cfg->model_name), "localmoe-tiny");
    snprintf(cfg->model_path, sizeof(cfg->model_path),
             "%.900s/models/localmoe-tiny", srcdir);
    snprintf(cfg->backend, sizeof(cfg->backend), "cpu");
    cfg->max_model_len = 128;
    cfg->block_size = 4;
    cfg->kv_cache_blocks = 64;
    cfg->max_num_seqs = 8;
    cfg->cpu_threads = 1;
}

/* moe_engine_create; NULL with a TAP diagnostic when it fails. */
static inline moe_engine_t *
tu_engine(const moe_config_t *cfg)
{
    char          err[1024];
    moe_engine_t *e;

    if (moe_engine_create(cfg, &e, err, sizeof(err)) != MOE_OK) {
        TAP_DIAG("engine: %s", err);
        return NULL;
    }
    return e;
}

#endif
