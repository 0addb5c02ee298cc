
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


static void *ngx_http_moe_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_moe_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_moe_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_moe_engine(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_moe_api(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_moe_thread_pool(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_moe_models_dir(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_moe_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_moe_init_process(ngx_cycle_t *cycle);
static void ngx_http_moe_exit_process(ngx_cycle_t *cycle);
static void ngx_http_moe_engine_log(void *ctx, int level, const char *msg);
static void ngx_http_moe_wake_handler(ngx_event_t *rev);


static ngx_conf_enum_t  ngx_http_moe_metrics_access[] = {
    { ngx_string("open"), NGX_HTTP_MOE_METRICS_OPEN },
    { ngx_string("key"), NGX_HTTP_MOE_METRICS_KEY },
    { ngx_string("admin"), NGX_HTTP_MOE_METRICS_ADMIN },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_moe_commands[] = {

    { ngx_string("moe_engine"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_moe_engine,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("moe_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_moe_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("moe_max_body_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_moe_loc_conf_t, max_body_size),
      NULL },

    { ngx_string("moe_sse_keepalive"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_moe_loc_conf_t, keepalive),
      NULL },

    { ngx_string("moe_thread_pool"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_moe_thread_pool,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("moe_models_dir"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_moe_models_dir,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("moe_load_wait"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_moe_main_conf_t, load_wait),
      NULL },

    { ngx_string("moe_handover_wait"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_moe_main_conf_t, handover_wait),
      NULL },

    { ngx_string("moe_metrics"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_moe_loc_conf_t, metrics),
      &ngx_http_moe_metrics_access },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_moe_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_moe_gate_init,                /* postconfiguration */

    ngx_http_moe_create_main_conf,         /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_moe_create_loc_conf,          /* create location configuration */
    ngx_http_moe_merge_loc_conf            /* merge location configuration */
};


ngx_module_t  ngx_http_moe_module = {
    NGX_MODULE_V1,
    &ngx_http_moe_module_ctx,              /* module context */
    ngx_http_moe_commands,                 /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_moe_init_module,              /* init module */
    ngx_http_moe_init_process,             /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_moe_exit_process,             /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static void *
ngx_http_moe_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_moe_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    /* the files below this one find their configuration by this index */
    ngx_http_moe_ctx_index = ngx_http_moe_module.ctx_index;

    mcf->load_wait = NGX_CONF_UNSET_MSEC;
    mcf->handover_wait = NGX_CONF_UNSET_MSEC;

    /*
     * set by ngx_pcalloc():
     *
     *     mcf->engine_file = { 0, NULL };
     *     mcf->config = NULL;
     *     mcf->engine = NULL;
     */

    return mcf;
}


static void *
ngx_http_moe_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_moe_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_moe_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->max_body_size = NGX_CONF_UNSET_SIZE;
    conf->keepalive = NGX_CONF_UNSET_MSEC;
    conf->metrics = NGX_CONF_UNSET_UINT;

    /*
     * set by ngx_pcalloc():
     *
     *     conf->thread_pool_name = { 0, NULL };
     *     conf->thread_pool = NULL;
     */

    return conf;
}


static char *
ngx_http_moe_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_moe_loc_conf_t *prev = parent;
    ngx_http_moe_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t  *clcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_size_value(conf->max_body_size, prev->max_body_size,
                              1024 * 1024);
    ngx_conf_merge_msec_value(conf->keepalive, prev->keepalive, 5000);
    ngx_conf_merge_uint_value(conf->metrics, prev->metrics,
                              NGX_HTTP_MOE_METRICS_KEY);
    ngx_conf_merge_str_value(conf->thread_pool_name, prev->thread_pool_name,
                             "default");

    if (conf->enable) {
        /*
         * templates and the tokenizer run on this pool; "default" is made
         * by the thread pool module (32 threads) when no "thread_pool"
         * directive declares it, any other name must be declared
         */

        conf->thread_pool = ngx_thread_pool_add(cf, &conf->thread_pool_name);
        if (conf->thread_pool == NULL) {
            return NGX_CONF_ERROR;
        }

        /*
         * moe_max_body_size is the core's limit here: nginx checks it
         * while reading, chunked bodies included, so nothing past it is
         * ever buffered; ngx_http_moe_gate.c turns the core's HTML 413
         * into the API's JSON error.
         */

        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
        clcf->client_max_body_size = conf->max_body_size;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_moe_engine(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_moe_main_conf_t *mcf = conf;

    u_char     *path;
    ngx_str_t  *value, name;
    char        err[NGX_HTTP_MOE_ERR_LEN];

    if (mcf->config != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;
    name = value[1];

    if (ngx_conf_full_name(cf->cycle, &name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    path = ngx_pnalloc(cf->pool, name.len + 1);
    if (path == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_cpystrn(path, name.data, name.len + 1);

    mcf->config = ngx_pcalloc(cf->pool, sizeof(moe_config_t));
    if (mcf->config == NULL) {
        return NGX_CONF_ERROR;
    }

    err[0] = '\0';

    if (moe_config_load((char *) path, mcf->config, err, sizeof(err))
        != MOE_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "moe_engine: %s", err);
        return NGX_CONF_ERROR;
    }

    /*
     * what can be known of the model before the worker loads it (path,
     * permissions, config.json, safetensors headers) fails "nginx -t" and
     * the start here, not a worker later
     */

    if (moe_model_check(mcf->config, err, sizeof(err)) != MOE_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "moe_engine: %s", err);
        return NGX_CONF_ERROR;
    }

    mcf->engine_file.data = path;
    mcf->engine_file.len = name.len;

    if (ngx_http_moe_gate_load(cf, mcf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_moe_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_moe_loc_conf_t *mlcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (mlcf->enable != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    mlcf->enable = 1;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_moe_handler;

    return NGX_CONF_OK;
}


static char *
ngx_http_moe_thread_pool(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_moe_loc_conf_t *mlcf = conf;

    ngx_str_t  *value;

    if (mlcf->thread_pool_name.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "moe_thread_pool: empty pool name");
        return NGX_CONF_ERROR;
    }

    mlcf->thread_pool_name = value[1];

    return NGX_CONF_OK;
}


/* moe_models_dir: POST /v1/models/switch loads only directories under it */

static char *
ngx_http_moe_models_dir(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_moe_main_conf_t *mcf = conf;

    u_char           *p;
    ngx_str_t        *value, name;
    ngx_file_info_t   fi;

    if (mcf->models_dir.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;
    name = value[1];

    if (ngx_conf_full_name(cf->cycle, &name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* NUL-terminated for realpath() on the loading thread */

    p = ngx_pnalloc(cf->pool, name.len + 1);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_cpystrn(p, name.data, name.len + 1);

    if (ngx_file_info(p, &fi) == NGX_FILE_ERROR || !ngx_is_dir(&fi)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "moe_models_dir \"%s\" is not a readable "
                           "directory", p);
        return NGX_CONF_ERROR;
    }

    mcf->models_dir.data = p;
    mcf->models_dir.len = name.len;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_moe_init_module(ngx_cycle_t *cycle)
{
    ngx_core_conf_t           *ccf;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_moe_module);

    if (mcf == NULL || mcf->config == NULL) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (ccf->master && ccf->worker_processes != 1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "moe_engine needs \"worker_processes 1\": one worker "
                      "hosts the engine and its GPU memory, %i configured",
                      ccf->worker_processes);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_moe_init_process(ngx_cycle_t *cycle)
{
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_moe_module);

    if (mcf == NULL || mcf->config == NULL) {
        return NGX_OK;
    }

    /* the cycle this worker serves (a failed reload may have reset it) */
    ngx_http_moe_ctx_index = ngx_http_moe_module.ctx_index;

    ngx_rbtree_init(&mcf->requests, &mcf->sentinel, ngx_rbtree_insert_value);

    mcf->events = ngx_alloc(NGX_HTTP_MOE_DRAIN * sizeof(moe_event_t),
                            cycle->log);
    if (mcf->events == NULL) {
        return NGX_ERROR;
    }

    mcf->cancel_timer.handler = ngx_http_moe_cancel_handler;
    mcf->cancel_timer.data = mcf;
    mcf->cancel_timer.log = cycle->log;
    mcf->cancel_timer.cancelable = 1;

    mcf->next_id = 1;
    mcf->wake_handler = ngx_http_moe_wake_handler;

    if (mcf->load_wait == NGX_CONF_UNSET_MSEC) {
        mcf->load_wait = 120000;
    }

    if (mcf->handover_wait == NGX_CONF_UNSET_MSEC) {
        mcf->handover_wait = 3000;
    }

    /* engine messages (load progress, overrides, preemptions) go to the
     * error log; ngx_log_error() only writes to file descriptors, which is
     * safe from the engine and loading threads too */
    moe_set_log(ngx_http_moe_engine_log, cycle->log);

    /*
     * The engines are made on threads (ngx_http_moe_inst.c): the worker
     * serves at once ("loading": 503 with Retry-After), waits for memory
     * an old worker still holds, and never exits for a model that does
     * not load (the master would be left with no worker, every client
     * hanging).
     */

    return ngx_http_moe_inst_init(cycle, mcf);
}


static void
ngx_http_moe_engine_log(void *ctx, int level, const char *msg)
{
    ngx_log_t   *log = ctx;
    ngx_uint_t   lvl;

    switch (level) {
    case MOE_LOG_ERROR: lvl = NGX_LOG_ERR; break;
    case MOE_LOG_WARN:  lvl = NGX_LOG_WARN; break;
    case MOE_LOG_INFO:  lvl = NGX_LOG_NOTICE; break;
    default:            lvl = NGX_LOG_INFO; break;
    }

    ngx_log_error(lvl, log, 0, "moe: %s", msg);
}


static void
ngx_http_moe_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_moe_module);

    if (mcf == NULL || mcf->config == NULL) {
        return;
    }

    /*
     * the thread pool module, a core module listed before this one, has
     * already run its exit_process: every text task posted has finished
     * and the pool threads are gone, so none uses a tokenizer the engines
     * free below
     */

    if (mcf->cancel_timer.timer_set) {
        ngx_del_timer(&mcf->cancel_timer);
    }

    ngx_http_moe_inst_exit(mcf);

    moe_set_log(NULL, NULL);

    ngx_free(mcf->events);
    mcf->events = NULL;
}


/*
 * An engine's thread wrote its eventfd: take every waiting event and hand
 * each one to its request.  Draining until the ring is empty makes this
 * correct for both edge- and level-triggered notification.
 */

static void
ngx_http_moe_wake_handler(ngx_event_t *rev)
{
    size_t                     i, n;
    moe_event_t               *ev;
    ngx_connection_t          *c, *conn;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_eng_t        *eng;
    ngx_http_moe_main_conf_t  *mcf;

    c = rev->data;
    eng = c->data;
    mcf = eng->inst->mcf;

    if (eng->engine == NULL || eng->destroying) {
        return;
    }

    for ( ;; ) {
        n = moe_engine_drain(eng->engine, mcf->events, NGX_HTTP_MOE_DRAIN);

        if (n == 0) {
            break;
        }

        for (i = 0; i < n; i++) {
            ev = &mcf->events[i];

            /* a request may be gone: its late events are of no use */

            ctx = ngx_http_moe_lookup(mcf, ev->req_id);
            if (ctx == NULL) {
                moe_event_release(ev);
                continue;
            }

            conn = ctx->request->connection;

            ngx_http_moe_stream_event(ctx, ev);

            /* its logprobs record, copied from by now */
            moe_event_release(ev);

            ngx_http_run_posted_requests(conn);
        }
    }

    if (eng->cancels->nelts) {
        ngx_http_moe_retry_cancels(eng);
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, rev->log, 0,
                      "moe: cannot re-arm the engine eventfd");
    }
}
