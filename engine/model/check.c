/*
 * moe_model_check(): what `nginx -t` can check of the configured models
 * before any worker loads them (directory and tokenizer.json readable,
 * config.json, the safetensors headers).  The model room's work, kept out
 * of the engine thread's file.
 */

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "model/model.h"


/* one model directory of moe_model_check() */
static int
moe_model_check_dir(const moe_config_t *c, const char *name,
    const char *dir, int line, char *err, size_t errlen)
{
    int           rc;
    char          why[MOE_PATH_MAX + 512], path[MOE_PATH_MAX + 32];
    moe_model_t  *m = NULL;

    why[0] = '\0';

    if (access(dir, R_OK | X_OK) != 0) {
        snprintf(why, sizeof(why), "%s: %s", dir, strerror(errno));
        rc = MOE_EIO;
        goto fail;
    }

    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    if (access(path, R_OK) != 0) {
        snprintf(why, sizeof(why), "%s: %s", path, strerror(errno));
        rc = MOE_EIO;
        goto fail;
    }

    if (strcmp(c->load_format, "dummy") == 0) {
        rc = moe_model_load_config(dir, 0, &m, why, sizeof(why));
    } else {
        /* the quantization config too (model/quant.h) */
        rc = moe_model_load_quant(dir, 0, c->quantization, 1, &m, why,
                                  sizeof(why));
    }
    moe_model_free(m);

    if (rc == MOE_OK) {
        return MOE_OK;
    }

fail:

    moe_errf(err, errlen, "%s:%d: model '%s': %s", c->file, line, name, why);
    return rc;
}


int
moe_model_check(const moe_config_t *c, char *err, size_t errlen)
{
    int  rc, i;

    rc = moe_model_check_dir(c, c->model_name, c->model_path, c->model_line,
                             err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }

    for (i = 0; i < c->n_instances; i++) {
        if (strcmp(c->instances[i].model_path, c->model_path) == 0) {
            continue;
        }
        rc = moe_model_check_dir(c, c->instances[i].model_name,
                                 c->instances[i].model_path,
                                 c->instances[i].line, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
    }

    return MOE_OK;
}
