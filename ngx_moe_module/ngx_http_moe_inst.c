
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


/*
 * Model instances.  Each vllm_instances entry (or the vllm: section's model
 * alone) is an instance: a served name, its own engine (thread, KV pool,
 * weights), its own admission counters.  Engines are made on a thread of
 * their own: the worker answers from its first moment (/health "loading",
 * 503 with Retry-After for generation), and a load that fails for memory
 * another process still holds (the old worker of a reload) is retried,
 * bounded by moe_load_wait.  A switch (POST /v1/models/switch) loads the
 * new engine beside the old one; requests keep going to the old one until
 * the swap, streams that run on it finish there, and it is destroyed (on
 * a thread, weights freed) after its last request.  When the two do not
 * fit at once, the old engine is drained first and the response says so.
 */


#define NGX_HTTP_MOE_LOAD_POLL    20      /* ms between looks at a load */
#define NGX_HTTP_MOE_LOAD_RETRY   250     /* ms before a load is retried */


struct ngx_http_moe_load_s {
    moe_config_t              *cfg;         /* the inst's, not owned */
    moe_engine_t              *engine;
    int                        rc;
    int                        done;        /* atomic */
    ngx_uint_t                 status;      /* HTTP status of a failure */
    pthread_t                  thread;
    unsigned                   started:1;
    char                       models_dir[MOE_PATH_MAX];
    char                       name[MOE_PATH_MAX];  /* switch: checked */
    char                       err[NGX_HTTP_MOE_ERR_LEN];
};


static ngx_int_t ngx_http_moe_inst_config(ngx_http_moe_inst_t *inst,
    moe_config_t *base, ngx_uint_t i);
static void ngx_http_moe_inst_set_name(ngx_http_moe_inst_t *inst,
    const char *name);
static ngx_int_t ngx_http_moe_load_start(ngx_http_moe_inst_t *inst,
    moe_config_t *cfg, const char *name);
static void *ngx_http_moe_load_thread(void *data);
static ngx_uint_t ngx_http_moe_load_check(ngx_http_moe_load_t *ld);
static void ngx_http_moe_load_handler(ngx_event_t *ev);
static void ngx_http_moe_load_done(ngx_http_moe_inst_t *inst,
    ngx_http_moe_load_t *ld);
static ngx_uint_t ngx_http_moe_load_oom(ngx_http_moe_load_t *ld);
static void ngx_http_moe_load_failed(ngx_http_moe_inst_t *inst,
    ngx_http_moe_load_t *ld);
static ngx_http_moe_eng_t *ngx_http_moe_eng_create(ngx_http_moe_inst_t *inst,
    moe_engine_t *engine);
static void ngx_http_moe_eng_detach(ngx_http_moe_eng_t *eng);
static void ngx_http_moe_eng_retire(ngx_http_moe_eng_t *eng);
static void ngx_http_moe_eng_reap(ngx_event_t *ev);
static void *ngx_http_moe_eng_destroy_thread(void *data);
static void ngx_http_moe_switch_reply(ngx_http_moe_inst_t *inst,
    ngx_uint_t status, const char *fmt, ...);


/*
 * Worker start: one instance per model, each load started on its own
 * thread.  NGX_ERROR only for the worker's own failures (memory); a model
 * that does not load is the instance's "failed" state, never the worker's
 * exit.
 */

ngx_int_t
ngx_http_moe_inst_init(ngx_cycle_t *cycle, ngx_http_moe_main_conf_t *mcf)
{
    ngx_uint_t            i, n;
    ngx_http_moe_inst_t  *inst;

    n = mcf->config->n_instances > 0 ? (ngx_uint_t) mcf->config->n_instances
                                     : 1;

    mcf->inst = ngx_pcalloc(cycle->pool, n * sizeof(ngx_http_moe_inst_t));
    if (mcf->inst == NULL) {
        return NGX_ERROR;
    }

    mcf->n_inst = n;
    mcf->log = cycle->log;

    for (i = 0; i < n; i++) {
        inst = &mcf->inst[i];

        inst->mcf = mcf;
        inst->index = i;
        inst->state = NGX_HTTP_MOE_INST_LOADING;

        inst->load_timer.handler = ngx_http_moe_load_handler;
        inst->load_timer.data = inst;
        inst->load_timer.log = cycle->log;

        if (ngx_http_moe_inst_config(inst, mcf->config, i) != NGX_OK) {
            return NGX_ERROR;
        }

        ngx_http_moe_admit_init(&inst->admit, inst->config);

        inst->load_start = ngx_current_msec;

        if (ngx_http_moe_load_start(inst, inst->config, NULL) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* instance i's engine configuration: the shared settings with its model */

static ngx_int_t
ngx_http_moe_inst_config(ngx_http_moe_inst_t *inst, moe_config_t *base,
    ngx_uint_t i)
{
    moe_config_t         *c;
    moe_instance_conf_t  *in;

    c = ngx_alloc(sizeof(moe_config_t), ngx_cycle->log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(c, base, sizeof(moe_config_t));

    if (base->n_instances > 0) {
        in = &base->instances[i];

        ngx_memcpy(c->model_name, in->model_name, sizeof(c->model_name));
        ngx_memcpy(c->model_path, in->model_path, sizeof(c->model_path));
        c->tensor_parallel_size = in->tensor_parallel_size;
        c->model_line = in->line;

        /* the served name: vllm.served_model_name names the entry that
         * is vllm.model_name, the others are named as written */
        if (ngx_strcmp(base->model_name, in->model_name) != 0) {
            ngx_cpystrn((u_char *) c->served_model_name,
                        (u_char *) in->model_name,
                        sizeof(c->served_model_name));
        }

        c->instances[0] = *in;
        c->n_instances = 1;
    }

    inst->config = c;
    ngx_http_moe_inst_set_name(inst, c->served_model_name);

    return NGX_OK;
}


static void
ngx_http_moe_inst_set_name(ngx_http_moe_inst_t *inst, const char *name)
{
    u_char  *last;

    last = ngx_cpystrn(inst->name_buf, (u_char *) name,
                       sizeof(inst->name_buf));

    inst->name.data = inst->name_buf;
    inst->name.len = last - inst->name_buf;
}


/* "loading" | "ok" | "failed" */

const char *
ngx_http_moe_inst_state(ngx_http_moe_inst_t *inst)
{
    if (inst->eng != NULL) {
        return "ok";
    }

    return inst->state == NGX_HTTP_MOE_INST_FAILED ? "failed" : "loading";
}


/* the instance serving `name` (compared by length), NULL if none */

ngx_http_moe_inst_t *
ngx_http_moe_inst_find(ngx_http_moe_main_conf_t *mcf, u_char *name,
    size_t len)
{
    ngx_uint_t  i;

    for (i = 0; i < mcf->n_inst; i++) {
        if (mcf->inst[i].name.len == len
            && ngx_memcmp(mcf->inst[i].name.data, name, len) == 0)
        {
            return &mcf->inst[i];
        }
    }

    return NULL;
}


/* the first instance with an engine, NULL while none has one */

ngx_http_moe_eng_t *
ngx_http_moe_inst_any(ngx_http_moe_main_conf_t *mcf)
{
    ngx_uint_t  i;

    for (i = 0; i < mcf->n_inst; i++) {
        if (mcf->inst[i].eng != NULL) {
            return mcf->inst[i].eng;
        }
    }

    return NULL;
}


/*
 * Why inst has no engine: a 503 in *err (NGX_DECLINED), with a
 * Retry-After header while it loads.
 */

static ngx_int_t
ngx_http_moe_inst_why(ngx_http_request_t *r, ngx_http_moe_inst_t *inst,
    ngx_http_moe_err_t *err)
{
    if (inst->state == NGX_HTTP_MOE_INST_FAILED) {
        return ngx_http_moe_fail(err, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                                 "the model failed to load: %V",
                                 &inst->failed);
    }

    if (ngx_http_moe_set_retry_after(r, ngx_http_moe_retry_after(inst))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    (void) ngx_http_moe_fail(err, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                             "the model \"%V\" is loading%s; retry later",
                             &inst->name,
                             inst->drained ? " (the old model was drained "
                             "first for a switch)" : "");
    err->code = "model_loading";

    return NGX_DECLINED;
}


/*
 * Routes the request to inst: ctx holds a reference to its current engine
 * until the request ends.  NGX_DECLINED with a 503 in *err (and a
 * Retry-After header) while the instance has no engine: loading, drained
 * for a switch, or failed.
 */

ngx_int_t
ngx_http_moe_inst_route(ngx_http_request_t *r, ngx_http_moe_ctx_t *ctx,
    ngx_http_moe_inst_t *inst, ngx_http_moe_err_t *err)
{
    if (ctx->eng != NULL) {
        return NGX_OK;
    }

    if (inst->eng == NULL) {
        return ngx_http_moe_inst_why(r, inst, err);
    }

    ctx->inst = inst;
    ctx->eng = inst->eng;
    ctx->eng->refs++;

    return NGX_OK;
}


/* no instance has an engine: 503 with the first one's reason */

ngx_int_t
ngx_http_moe_inst_unavailable(ngx_http_request_t *r,
    ngx_http_moe_main_conf_t *mcf)
{
    ngx_http_moe_err_t  err;

    if (mcf->n_inst == 0) {
        return ngx_http_moe_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                                       "no engine is running (is "
                                       "\"moe_engine\" configured?)");
    }

    if (ngx_http_moe_inst_why(r, &mcf->inst[0], &err) == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_moe_send_err(r, &err);
}


/* ------------------------------------------------------------- loading */


static ngx_int_t
ngx_http_moe_load_start(ngx_http_moe_inst_t *inst, moe_config_t *cfg,
    const char *name)
{
    int                   rc;
    ngx_http_moe_load_t  *ld;

    ld = ngx_calloc(sizeof(ngx_http_moe_load_t), inst->mcf->log);
    if (ld == NULL) {
        return NGX_ERROR;
    }

    ld->cfg = cfg;

    if (name != NULL) {
        ngx_cpystrn((u_char *) ld->name, (u_char *) name, sizeof(ld->name));
        ngx_cpystrn((u_char *) ld->models_dir, inst->mcf->models_dir.data,
                    ngx_min(sizeof(ld->models_dir),
                            inst->mcf->models_dir.len + 1));
    }

    rc = pthread_create(&ld->thread, NULL, ngx_http_moe_load_thread, ld);
    if (rc != 0) {
        ngx_log_error(NGX_LOG_ALERT, inst->mcf->log, rc,
                      "moe: cannot start the loading thread");
        ngx_free(ld);
        return NGX_ERROR;
    }

    ld->started = 1;
    inst->load = ld;
    inst->attempts++;

    ngx_add_timer(&inst->load_timer, NGX_HTTP_MOE_LOAD_POLL);

    return NGX_OK;
}


/*
 * The loading thread: for a switch, the model directory is checked first
 * (under models_dir after realpath, config.json, safetensors headers);
 * then the engine is created.  It touches only *ld.
 */

static void *
ngx_http_moe_load_thread(void *data)
{
    ngx_http_moe_load_t  *ld = data;

    ld->status = NGX_HTTP_OK;

    if (ld->name[0] != '\0') {
        ld->status = ngx_http_moe_load_check(ld);
    }

    if (ld->status == NGX_HTTP_OK) {
        ld->rc = moe_engine_create(ld->cfg, &ld->engine, ld->err,
                                   sizeof(ld->err));

        if (ld->rc != MOE_OK) {
            ld->engine = NULL;
            ld->status = ld->rc == MOE_ENOMEM
                         ? NGX_HTTP_SERVICE_UNAVAILABLE
                         : NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

    } else {
        ld->rc = MOE_EINVAL;
    }

    __atomic_store_n(&ld->done, 1, __ATOMIC_RELEASE);

    return NULL;
}


/* a switch target: a directory under models_dir, also after realpath */

static ngx_uint_t
ngx_http_moe_load_check(ngx_http_moe_load_t *ld)
{
    size_t         n;
    struct stat    st;
    moe_config_t  *c;
    char           root[PATH_MAX], real[PATH_MAX];
    char           path[2 * MOE_PATH_MAX + 16];

    c = ld->cfg;

    if (realpath(ld->models_dir, root) == NULL) {
        ngx_snprintf((u_char *) ld->err, sizeof(ld->err) - 1,
                     "moe_models_dir \"%s\" is not readable%Z",
                     ld->models_dir);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_snprintf((u_char *) path, sizeof(path) - 1, "%s/%s%Z", root,
                 ld->name);

    if (realpath(path, real) == NULL) {
        ngx_snprintf((u_char *) ld->err, sizeof(ld->err) - 1,
                     "no model \"%s\" under the models directory%Z",
                     ld->name);
        return NGX_HTTP_NOT_FOUND;
    }

    n = ngx_strlen(root);

    if (ngx_strncmp(real, root, n) != 0 || real[n] != '/') {
        ngx_snprintf((u_char *) ld->err, sizeof(ld->err) - 1,
                     "model \"%s\" resolves outside the models directory "
                     "(a symbolic link out of it)%Z", ld->name);
        return NGX_HTTP_FORBIDDEN;
    }

    if (stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
        ngx_snprintf((u_char *) ld->err, sizeof(ld->err) - 1,
                     "model \"%s\" is not a directory%Z", ld->name);
        return NGX_HTTP_BAD_REQUEST;
    }

    if (ngx_strlen(real) >= sizeof(c->model_path)) {
        ngx_snprintf((u_char *) ld->err, sizeof(ld->err) - 1,
                     "model \"%s\": path too long%Z", ld->name);
        return NGX_HTTP_BAD_REQUEST;
    }

    ngx_cpystrn((u_char *) c->model_path, (u_char *) real,
                sizeof(c->model_path));
    ngx_cpystrn((u_char *) c->model_name, (u_char *) ld->name,
                sizeof(c->model_name));
    ngx_cpystrn((u_char *) c->served_model_name, (u_char *) ld->name,
                sizeof(c->served_model_name));
    ngx_memcpy(c->instances[0].model_path, c->model_path,
               sizeof(c->model_path));
    ngx_memcpy(c->instances[0].model_name, c->model_name,
               sizeof(c->model_name));

    if (moe_model_check(c, ld->err, sizeof(ld->err)) != MOE_OK) {
        return NGX_HTTP_BAD_REQUEST;
    }

    return NGX_HTTP_OK;
}


/* inst->load_timer: looks at the load (or starts a retry) */

static void
ngx_http_moe_load_handler(ngx_event_t *ev)
{
    ngx_http_moe_inst_t  *inst;
    ngx_http_moe_load_t  *ld;

    inst = ev->data;
    ld = inst->load;

    if (ld == NULL) {
        /* a retry after a failed allocation is due */
        if (ngx_http_moe_load_start(inst, inst->switch_cfg
                                          ? inst->switch_cfg
                                          : inst->config,
                                    NULL)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ALERT, inst->mcf->log, 0,
                          "moe: cannot retry loading \"%V\"", &inst->name);
        }

        return;
    }

    if (!__atomic_load_n(&ld->done, __ATOMIC_ACQUIRE)) {
        ngx_add_timer(&inst->load_timer, NGX_HTTP_MOE_LOAD_POLL);
        return;
    }

    (void) pthread_join(ld->thread, NULL);
    inst->load = NULL;

    if (ld->rc == MOE_OK) {
        ngx_http_moe_load_done(inst, ld);

    } else {
        ngx_http_moe_load_failed(inst, ld);
    }

    ngx_free(ld);
}


static void
ngx_http_moe_load_done(ngx_http_moe_inst_t *inst, ngx_http_moe_load_t *ld)
{
    ngx_http_moe_eng_t  *eng, *old;

    eng = ngx_http_moe_eng_create(inst, ld->engine);
    if (eng == NULL) {
        moe_engine_destroy(ld->engine);
        ngx_cpystrn((u_char *) ld->err,
                    (u_char *) "cannot watch the engine's eventfd",
                    sizeof(ld->err));
        ld->rc = MOE_ENOMEM;
        ld->status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        ngx_http_moe_load_failed(inst, ld);
        return;
    }

    inst->last_load_ms = ngx_current_msec - inst->load_start;
    inst->loads++;
    inst->attempts = 0;

    if (inst->switch_cfg != NULL) {
        old = inst->eng;

        ngx_free(inst->config);
        inst->config = inst->switch_cfg;
        inst->switch_cfg = NULL;

        inst->eng = eng;
        inst->state = NGX_HTTP_MOE_INST_OK;
        ngx_http_moe_inst_set_name(inst, eng->info->served_name);
        inst->switches++;

        if (old != NULL) {
            ngx_http_moe_eng_retire(old);
        }

        ngx_log_error(NGX_LOG_NOTICE, inst->mcf->log, 0,
                      "moe: serving \"%s\" (%s, %s backend, max_model_len "
                      "%d), switched in %M ms%s",
                      eng->info->served_name, eng->info->architecture,
                      eng->info->backend, eng->info->max_model_len,
                      inst->last_load_ms,
                      inst->drained ? " after draining the old model" : "");

        ngx_http_moe_switch_reply(inst, NGX_HTTP_OK,
                                  inst->drained
                                  ? "switched; there was no room for both "
                                    "models, so the old one was drained "
                                    "first"
                                  : "switched; the old model finishes its "
                                    "running requests and is then freed");
        inst->drained = 0;
        return;
    }

    inst->eng = eng;
    inst->state = NGX_HTTP_MOE_INST_OK;

    ngx_log_error(NGX_LOG_NOTICE, inst->mcf->log, 0,
                  "moe: serving \"%s\" (%s, %s backend, max_model_len %d), "
                  "loaded in %M ms",
                  eng->info->served_name, eng->info->architecture,
                  eng->info->backend, eng->info->max_model_len,
                  inst->last_load_ms);

    if (inst->drained) {
        /* the old model is back after a failed switch */
        inst->drained = 0;
    }
}


/*
 * The load failed for memory: MOE_ENOMEM, or a device allocation that a
 * backend reported as its own failure (CUDA: "out of memory")
 */

static ngx_uint_t
ngx_http_moe_load_oom(ngx_http_moe_load_t *ld)
{
    if (ld->rc == MOE_ENOMEM) {
        return 1;
    }

    return ld->rc == MOE_EBACKEND
           && ngx_strstr(ld->err, "out of memory") != NULL;
}


static void
ngx_http_moe_load_failed(ngx_http_moe_inst_t *inst, ngx_http_moe_load_t *ld)
{
    u_char              *p;
    ngx_http_moe_eng_t  *eng;

    if (ngx_http_moe_load_oom(ld) && inst->switch_cfg == NULL
        && ngx_current_msec - inst->load_start < inst->mcf->load_wait)
    {
        /*
         * Another process (the old worker of a reload, or a binary
         * upgrade) may still hold the memory: wait for it, bounded.
         */

        /* the first attempt and one in 20 after it (every 5 s) */
        if (inst->attempts % 20 == 1) {
            ngx_log_error(NGX_LOG_WARN, inst->mcf->log, 0,
                          "moe: \"%V\": waiting for memory held by the old "
                          "worker (attempt %ui, %M ms of %M): %s",
                          &inst->name, inst->attempts,
                          ngx_current_msec - inst->load_start,
                          inst->mcf->load_wait, ld->err);
        }

        ngx_add_timer(&inst->load_timer, NGX_HTTP_MOE_LOAD_RETRY);
        return;
    }

    if (inst->switch_cfg != NULL) {

        if (ngx_http_moe_load_oom(ld) && inst->eng != NULL && !inst->drained)
        {
            /*
             * No room for both: drain the old model, then load the new
             * one alone.  Requests meanwhile get 503 + Retry-After.
             */

            ngx_log_error(NGX_LOG_WARN, inst->mcf->log, 0,
                          "moe: \"%V\": no memory to load \"%s\" beside "
                          "it (%s); draining the old model first",
                          &inst->name, inst->switch_cfg->model_name,
                          ld->err);

            inst->drained = 1;
            eng = inst->eng;
            inst->eng = NULL;
            inst->load_start = ngx_current_msec;
            ngx_http_moe_eng_retire(eng);

            /* the load restarts when the old engine is destroyed */
            return;
        }

        inst->switch_failures++;

        ngx_log_error(NGX_LOG_ERR, inst->mcf->log, 0,
                      "moe: switch of \"%V\" to \"%s\" failed: %s",
                      &inst->name, inst->switch_cfg->model_name, ld->err);

        ngx_http_moe_switch_reply(inst, ld->status ? ld->status
                                  : NGX_HTTP_INTERNAL_SERVER_ERROR,
                                  "%s%s", ld->err,
                                  inst->drained
                                  ? " (the old model was drained first "
                                    "and is loading again)"
                                  : "; the old model keeps serving");

        ngx_free(inst->switch_cfg);
        inst->switch_cfg = NULL;

        if (inst->drained) {
            /* bring the old model back */
            inst->load_start = ngx_current_msec;

            if (ngx_http_moe_load_start(inst, inst->config, NULL)
                != NGX_OK)
            {
                inst->state = NGX_HTTP_MOE_INST_FAILED;
            }
        }

        return;
    }

    ngx_log_error(NGX_LOG_EMERG, inst->mcf->log, 0,
                  "moe_engine \"%V\" failed to start: %s (%s); "
                  "every request is answered 503 with the reason",
                  &inst->mcf->engine_file, ld->err, moe_strerror(ld->rc));

    inst->state = NGX_HTTP_MOE_INST_FAILED;

    p = ngx_snprintf(inst->failed_buf, sizeof(inst->failed_buf) - 1,
                     "%s (%s)", ld->err, moe_strerror(ld->rc));
    *p = '\0';

    inst->failed.data = inst->failed_buf;
    inst->failed.len = p - inst->failed_buf;

    if (inst->index == 0) {
        inst->mcf->failed = inst->failed;
    }
}


/* ------------------------------------------------------------- engines */


static ngx_http_moe_eng_t *
ngx_http_moe_eng_create(ngx_http_moe_inst_t *inst, moe_engine_t *engine)
{
    int                   fd;
    moe_stats_t           st;
    ngx_event_t          *rev;
    ngx_connection_t     *c;
    ngx_http_moe_eng_t   *eng;

    eng = ngx_calloc(sizeof(ngx_http_moe_eng_t), inst->mcf->log);
    if (eng == NULL) {
        return NULL;
    }

    eng->cancels = ngx_array_create(ngx_cycle->pool, 16, sizeof(uint64_t));
    if (eng->cancels == NULL) {
        ngx_free(eng);
        return NULL;
    }

    eng->engine = engine;
    eng->inst = inst;
    eng->info = moe_engine_info(engine);
    eng->tokenizer = moe_engine_tokenizer(engine);
    eng->refs = 1;                          /* the instance's */

    moe_engine_stats(engine, &st);
    eng->weights_bytes = st.weights_bytes;

    eng->reap.handler = ngx_http_moe_eng_reap;
    eng->reap.data = eng;
    eng->reap.log = inst->mcf->log;

    fd = moe_engine_eventfd(engine);

    c = ngx_get_connection(fd, inst->mcf->log);
    if (c == NULL) {
        ngx_free(eng);
        return NULL;
    }

    c->data = eng;

    rev = c->read;
    rev->handler = inst->mcf->wake_handler;
    rev->log = inst->mcf->log;

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        c->fd = (ngx_socket_t) -1;
        ngx_free_connection(c);
        ngx_free(eng);
        return NULL;
    }

    eng->wake = c;

    return eng;
}


/* the engine's eventfd leaves the event loop (the engine closes it) */

static void
ngx_http_moe_eng_detach(ngx_http_moe_eng_t *eng)
{
    ngx_connection_t  *c;

    c = eng->wake;

    if (c == NULL) {
        return;
    }

    if (c->read->active || c->read->disabled) {
        ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    c->fd = (ngx_socket_t) -1;
    ngx_free_connection(c);
    eng->wake = NULL;
}


/* the engine is no longer the instance's: freed after its last request */

static void
ngx_http_moe_eng_retire(ngx_http_moe_eng_t *eng)
{
    ngx_http_moe_inst_t  *inst;

    inst = eng->inst;

    eng->retired = 1;
    eng->next = inst->retired;
    inst->retired = eng;

    ngx_http_moe_eng_unref(eng);
}


/*
 * eng->reap: posted when a retired engine's last reference went; then a
 * timer until its destroying thread is done.
 */

static void
ngx_http_moe_eng_reap(ngx_event_t *ev)
{
    int                    rc;
    ngx_http_moe_eng_t    *eng, **pp;
    ngx_http_moe_inst_t   *inst;

    eng = ev->data;
    inst = eng->inst;

    if (!eng->destroying) {
        if (eng->refs > 0) {
            return;
        }

        /* its events are of no use now: every request has gone */
        ngx_http_moe_eng_detach(eng);
        eng->destroying = 1;

        rc = pthread_create(&eng->thread, NULL,
                            ngx_http_moe_eng_destroy_thread, eng);
        if (rc != 0) {
            /* no thread: destroy here, the loop waits this once */
            moe_engine_destroy(eng->engine);
            eng->engine = NULL;
            __atomic_store_n(&eng->destroyed, 2, __ATOMIC_RELEASE);
        }

        ngx_add_timer(&eng->reap, NGX_HTTP_MOE_LOAD_POLL);
        return;
    }

    rc = __atomic_load_n(&eng->destroyed, __ATOMIC_ACQUIRE);

    if (rc == 0) {
        ngx_add_timer(&eng->reap, NGX_HTTP_MOE_LOAD_POLL);
        return;
    }

    if (rc == 1) {
        (void) pthread_join(eng->thread, NULL);
    }

    for (pp = &inst->retired; *pp; pp = &(*pp)->next) {
        if (*pp == eng) {
            *pp = eng->next;
            break;
        }
    }

    inst->engines_freed++;
    inst->weights_freed += eng->weights_bytes;

    ngx_log_error(NGX_LOG_NOTICE, inst->mcf->log, 0,
                  "moe: \"%V\": the old engine is destroyed, %L MiB of "
                  "weights freed", &inst->name, eng->weights_bytes >> 20);

    ngx_free(eng);

    if (inst->switch_cfg != NULL && inst->drained && inst->eng == NULL
        && inst->load == NULL && !inst->load_timer.timer_set)
    {
        /* drained for a switch: now the new model alone */
        inst->load_start = ngx_current_msec;

        if (ngx_http_moe_load_start(inst, inst->switch_cfg, NULL) != NGX_OK)
        {
            ngx_http_moe_switch_reply(inst, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                      "cannot start the loading thread");
        }
    }
}


static void *
ngx_http_moe_eng_destroy_thread(void *data)
{
    ngx_http_moe_eng_t  *eng = data;

    moe_engine_destroy(eng->engine);
    eng->engine = NULL;

    __atomic_store_n(&eng->destroyed, 1, __ATOMIC_RELEASE);

    return NULL;
}


/*
 * A graceful exit (reload, quit; not terminate): the new worker usually
 * took the weights long ago (it imports while this one still streams);
 * otherwise wait, bounded by moe_handover_wait, so that it can still
 * import them instead of reading the files.
 */

static void
ngx_http_moe_inst_handover(ngx_http_moe_main_conf_t *mcf)
{
    int                   rc;
    double                ms;
    int64_t               pid;
    ngx_uint_t            i;
    ngx_msec_t            start, spent;
    ngx_http_moe_inst_t  *inst;

    if (!ngx_exiting || ngx_terminate || mcf->handover_wait == 0) {
        return;
    }

    ngx_time_update();
    start = ngx_current_msec;

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        if (inst->eng == NULL) {
            continue;
        }

        ngx_time_update();
        spent = ngx_current_msec - start;

        rc = moe_engine_handover_wait(inst->eng->engine,
                                      spent < mcf->handover_wait
                                      ? (int) (mcf->handover_wait - spent)
                                      : 0,
                                      &pid, &ms);

        if (rc == 1) {
            ngx_log_error(NGX_LOG_NOTICE, mcf->log, 0,
                          "moe: model \"%V\": weights handed over to pid "
                          "%L in %.1f ms", &inst->name, pid, ms);

        } else if (rc == 0) {
            ngx_log_error(NGX_LOG_NOTICE, mcf->log, 0,
                          "moe: model \"%V\": no new worker took the "
                          "weights within %M ms", &inst->name,
                          mcf->handover_wait);
        }
    }
}


/* worker exit: every load joined, every engine destroyed */

void
ngx_http_moe_inst_exit(ngx_http_moe_main_conf_t *mcf)
{
    ngx_uint_t            i;
    ngx_http_moe_eng_t   *eng, *next;
    ngx_http_moe_inst_t  *inst;

    ngx_http_moe_inst_handover(mcf);

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        if (inst->load_timer.timer_set) {
            ngx_del_timer(&inst->load_timer);
        }

        if (inst->load != NULL) {
            (void) pthread_join(inst->load->thread, NULL);
            if (inst->load->engine != NULL) {
                moe_engine_destroy(inst->load->engine);
            }
            ngx_free(inst->load);
            inst->load = NULL;
        }

        if (inst->eng != NULL) {
            ngx_http_moe_eng_detach(inst->eng);
            moe_engine_destroy(inst->eng->engine);
            ngx_free(inst->eng);
            inst->eng = NULL;
        }

        for (eng = inst->retired; eng; eng = next) {
            next = eng->next;

            if (eng->reap.timer_set) {
                ngx_del_timer(&eng->reap);
            }

            if (eng->reap.posted) {
                ngx_delete_posted_event(&eng->reap);
            }

            if (eng->destroying) {
                if (__atomic_load_n(&eng->destroyed, __ATOMIC_ACQUIRE) != 2)
                {
                    (void) pthread_join(eng->thread, NULL);
                }

            } else {
                ngx_http_moe_eng_detach(eng);
                moe_engine_destroy(eng->engine);
            }

            ngx_free(eng);
        }

        inst->retired = NULL;

        ngx_free(inst->switch_cfg);
        inst->switch_cfg = NULL;
        ngx_free(inst->config);
        inst->config = NULL;
    }
}


/* -------------------------------------------------------------- switch */


/*
 * POST /v1/models/switch {"model_name", "tensor_parallel_size"?,
 * "instance"?} (the admin key: ngx_http_moe_gate.c).  The answer comes
 * when the new model serves or the switch failed.
 */

ngx_int_t
ngx_http_moe_inst_switch(ngx_http_request_t *r, yajl_val root)
{
    int64_t                    tp;
    yajl_val                   v;
    ngx_str_t                  name;
    ngx_uint_t                 i;
    moe_config_t              *cfg;
    ngx_http_moe_inst_t       *inst, *other;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (mcf->models_dir.len == 0) {
        return ngx_http_moe_send_error(r, NGX_HTTP_NOT_IMPLEMENTED, NULL,
                                       "model switching is off: set "
                                       "\"moe_models_dir\" to the directory "
                                       "that holds the models it may "
                                       "load");
    }

    v = ngx_http_moe_json_get(root, "model_name");

    if (v == NULL || !YAJL_IS_STRING(v)) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "model_name",
                                       "model_name (a string) is required");
    }

    name.data = (u_char *) v->u.string;
    name.len = ngx_strlen(v->u.string);

    /* a name under models_dir: relative, no "..", nothing odd */

    if (name.len == 0 || name.len >= MOE_NAME_MAX || name.data[0] == '/') {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "model_name",
                                       "model_name must be a relative "
                                       "directory name under the models "
                                       "directory");
    }

    for (i = 0; i < name.len; i++) {
        if (name.data[i] < 0x20 || name.data[i] == '\\'
            || (name.data[i] == '.' && i + 1 < name.len
                && name.data[i + 1] == '.'
                && (i == 0 || name.data[i - 1] == '/')
                && (i + 2 == name.len || name.data[i + 2] == '/')))
        {
            return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST,
                                           "model_name",
                                           "model_name must not contain "
                                           "\"..\" or control characters");
        }
    }

    inst = &mcf->inst[0];

    v = ngx_http_moe_json_get(root, "instance");

    if (v != NULL) {
        if (YAJL_IS_STRING(v)) {
            inst = ngx_http_moe_inst_find(mcf, (u_char *) v->u.string,
                                          ngx_strlen(v->u.string));

        } else if (YAJL_IS_INTEGER(v) && YAJL_GET_INTEGER(v) >= 0
                   && (ngx_uint_t) YAJL_GET_INTEGER(v) < mcf->n_inst)
        {
            inst = &mcf->inst[YAJL_GET_INTEGER(v)];

        } else {
            inst = NULL;
        }

        if (inst == NULL) {
            return ngx_http_moe_send_error(r, NGX_HTTP_NOT_FOUND, "instance",
                                           "no such instance (give its "
                                           "served model name or its index "
                                           "in vllm_instances)");
        }
    }

    other = ngx_http_moe_inst_find(mcf, name.data, name.len);

    if (other != NULL && other != inst) {
        return ngx_http_moe_send_error(r, NGX_HTTP_CONFLICT, "model_name",
                                       "another instance already serves "
                                       "\"%V\"", &name);
    }

    if (inst->switch_cfg != NULL || inst->load != NULL
        || inst->load_timer.timer_set)
    {
        return ngx_http_moe_send_error(r, NGX_HTTP_CONFLICT, NULL,
                                       "instance \"%V\" is already loading "
                                       "a model", &inst->name);
    }

    tp = inst->config->tensor_parallel_size;

    v = ngx_http_moe_json_get(root, "tensor_parallel_size");

    if (v != NULL) {
        if (ngx_http_moe_json_int(v, &tp) != NGX_OK || tp < 1
            || tp > MOE_MAX_GPUS)
        {
            return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST,
                                           "tensor_parallel_size",
                                           "tensor_parallel_size must be an "
                                           "integer in 1..%d",
                                           MOE_MAX_GPUS);
        }

        if (inst->config->n_instances > 0
            && inst->config->instances[0].n_gpu_devices > 0
            && tp != inst->config->instances[0].n_gpu_devices)
        {
            return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST,
                                           "tensor_parallel_size",
                                           "tensor_parallel_size %L does "
                                           "not match the instance's %d "
                                           "gpu_devices", tp,
                                           inst->config->instances[0]
                                               .n_gpu_devices);
        }
    }

    cfg = ngx_alloc(sizeof(moe_config_t), r->connection->log);
    if (cfg == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memcpy(cfg, inst->config, sizeof(moe_config_t));
    cfg->tensor_parallel_size = (int) tp;
    cfg->instances[0].tensor_parallel_size = (int) tp;

    /* the model's own chat template, not the old model's */
    cfg->chat_template[0] = '\0';
    cfg->chat_template_file[0] = '\0';

    inst->switch_cfg = cfg;
    inst->switch_req = r;
    inst->drained = 0;
    inst->load_start = ngx_current_msec;

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "moe: switching \"%V\" to \"%V\" (tensor_parallel_size "
                  "%L): loading beside the old model", &inst->name, &name,
                  tp);

    if (ngx_http_moe_load_start(inst, cfg, (const char *) name.data)
        != NGX_OK)
    {
        inst->switch_cfg = NULL;
        inst->switch_req = NULL;
        ngx_free(cfg);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* ngx_http_moe_switch_reply() finalizes the request (the reference
     * the body reading took) */

    return NGX_DONE;
}


static void
ngx_http_moe_switch_reply(ngx_http_moe_inst_t *inst, ngx_uint_t status,
    const char *fmt, ...)
{
    u_char               *p;
    va_list               args;
    yajl_gen              g;
    ngx_int_t             rc;
    ngx_http_request_t   *r;
    ngx_http_moe_err_t    err;
    u_char                msg[NGX_HTTP_MOE_ERR_LEN];

    r = inst->switch_req;
    inst->switch_req = NULL;

    if (r == NULL) {
        return;
    }

    va_start(args, fmt);
    p = ngx_vslprintf(msg, msg + sizeof(msg) - 1, fmt, args);
    va_end(args);
    *p = '\0';

    if (r->connection->error) {
        ngx_http_finalize_request(r, NGX_HTTP_CLIENT_CLOSED_REQUEST);
        return;
    }

    if (status != NGX_HTTP_OK) {
        (void) ngx_http_moe_fail(&err, status, "model_name", "%s", msg);
        rc = ngx_http_moe_send_err(r, &err);
        ngx_http_finalize_request(r, rc);
        return;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "status");
    ngx_http_moe_gen_lit(g, "ok");
    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_str(g, inst->name.data, inst->name.len);
    ngx_http_moe_gen_lit(g, "instance");
    yajl_gen_integer(g, (long long) inst->index);
    ngx_http_moe_gen_lit(g, "drained_first");
    yajl_gen_bool(g, inst->drained ? 1 : 0);
    ngx_http_moe_gen_lit(g, "load_ms");
    yajl_gen_integer(g, (long long) inst->last_load_ms);
    ngx_http_moe_gen_lit(g, "message");
    ngx_http_moe_gen_cstr(g, (char *) msg);
    yajl_gen_map_close(g);

    rc = ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
    ngx_http_finalize_request(r, rc);
}
