
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


static void ngx_http_moe_gen_model(yajl_gen g, const moe_model_info_t *info);
static void ngx_http_moe_gen_int(yajl_gen g, const char *key, int64_t n);
static void ngx_http_moe_gen_double(yajl_gen g, const char *key, double d);
static void ngx_http_moe_gen_rank_load(yajl_gen g, moe_engine_t *engine);
static ngx_int_t ngx_http_moe_check_name(ngx_http_request_t *r,
    ngx_str_t *name, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_health_inst(ngx_http_request_t *r,
    ngx_str_t *name);
static ngx_int_t ngx_http_moe_info_post(ngx_http_request_t *r,
    ngx_http_moe_text_t *t, ngx_http_moe_text_done_pt done);
static ngx_int_t ngx_http_moe_info_tools(ngx_http_request_t *r,
    yajl_val root, yajl_val messages, ngx_http_moe_text_t *t,
    ngx_http_moe_err_t *err);
static void ngx_http_moe_tokenize_done(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);
static void ngx_http_moe_detokenize_done(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);


typedef struct {
    const char                *name;
    const char                *type;
    const char                *help;
} ngx_http_moe_metric_t;


static ngx_str_t  ngx_http_moe_prometheus_type =
    ngx_string("text/plain; version=0.0.4; charset=utf-8");


/*
 * GET /health: 200 {"status":"ok"} when every instance serves; 503 with
 * "loading" (an engine is being made: at start, a reload's new worker
 * waiting for memory, a switch that drained first) or "failed" and the
 * reason.  "instances" gives each instance's own state.
 */

ngx_int_t
ngx_http_moe_health(ngx_http_request_t *r)
{
    yajl_gen                   g;
    ngx_str_t                  name;
    ngx_uint_t                 i, n_ok, n_failed;
    moe_stats_t                st;
    ngx_http_moe_inst_t       *inst, *bad;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (ngx_http_arg(r, (u_char *) "model", 5, &name) == NGX_OK) {
        return ngx_http_moe_health_inst(r, &name);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    n_ok = 0;
    n_failed = 0;
    bad = NULL;

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        if (inst->eng != NULL) {
            n_ok++;

        } else if (inst->state == NGX_HTTP_MOE_INST_FAILED) {
            n_failed++;
            bad = inst;

        } else if (bad == NULL) {
            bad = inst;
        }
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "status");

    if (mcf->n_inst == 0) {
        ngx_http_moe_gen_lit(g, "failed");
        ngx_http_moe_gen_lit(g, "reason");
        ngx_http_moe_gen_lit(g, "no engine is running");

    } else if (n_ok == mcf->n_inst) {
        ngx_http_moe_gen_lit(g, "ok");

    } else if (n_failed) {
        ngx_http_moe_gen_lit(g, "failed");
        ngx_http_moe_gen_lit(g, "reason");
        ngx_http_moe_gen_str(g, bad->failed.data, bad->failed.len);

    } else {
        ngx_http_moe_gen_lit(g, "loading");
        ngx_http_moe_gen_lit(g, "reason");
        ngx_http_moe_gen_lit(g, "a model is loading");
        ngx_http_moe_gen_int(g, "retry_after",
                             (int64_t) ngx_http_moe_retry_after(bad));
    }

    if (mcf->n_inst && mcf->inst[0].eng) {
        /* the first instance's figures, as before instances existed */
        moe_engine_stats(mcf->inst[0].eng->engine, &st);
        ngx_http_moe_gen_lit(g, "model");
        ngx_http_moe_gen_cstr(g, mcf->inst[0].eng->info->served_name);
        ngx_http_moe_gen_int(g, "running", st.seqs_running);
        ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
        ngx_http_moe_gen_int(g, "kv_blocks_used", st.kv_blocks_used);
        ngx_http_moe_gen_int(g, "kv_blocks_total", st.kv_blocks_total);
    }

    ngx_http_moe_gen_lit(g, "instances");
    yajl_gen_array_open(g);

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "model");
        ngx_http_moe_gen_str(g, inst->name.data, inst->name.len);
        ngx_http_moe_gen_lit(g, "status");
        ngx_http_moe_gen_cstr(g, ngx_http_moe_inst_state(inst));

        if (inst->eng) {
            moe_engine_stats(inst->eng->engine, &st);
            ngx_http_moe_gen_int(g, "running", st.seqs_running);
            ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);

        } else if (inst->state == NGX_HTTP_MOE_INST_FAILED) {
            ngx_http_moe_gen_lit(g, "reason");
            ngx_http_moe_gen_str(g, inst->failed.data, inst->failed.len);
        }

        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);

    if (mcf->n_inst && n_ok == mcf->n_inst) {
        return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
    }

    if (!n_failed && bad != NULL
        && ngx_http_moe_set_retry_after(r, ngx_http_moe_retry_after(bad))
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_moe_send_gen(r, NGX_HTTP_SERVICE_UNAVAILABLE, g);
}


/*
 * GET /health?model=NAME: that instance alone (for a front nginx that
 * balances one model over replicas): 200 ok, 503 loading (Retry-After) or
 * failed, 404 for a name no instance serves
 */

static ngx_int_t
ngx_http_moe_health_inst(ngx_http_request_t *r, ngx_str_t *name)
{
    yajl_gen                   g;
    moe_stats_t                st;
    ngx_http_moe_err_t         err;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    inst = ngx_http_moe_inst_find(mcf, name->data, name->len);

    if (inst == NULL) {
        (void) ngx_http_moe_check_name(r, name, &err);
        return ngx_http_moe_send_err(r, &err);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "status");
    ngx_http_moe_gen_cstr(g, ngx_http_moe_inst_state(inst));
    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_str(g, inst->name.data, inst->name.len);

    if (inst->eng) {
        moe_engine_stats(inst->eng->engine, &st);
        ngx_http_moe_gen_int(g, "running", st.seqs_running);
        ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
        ngx_http_moe_gen_int(g, "kv_blocks_used", st.kv_blocks_used);
        ngx_http_moe_gen_int(g, "kv_blocks_total", st.kv_blocks_total);

    } else if (inst->state == NGX_HTTP_MOE_INST_FAILED) {
        ngx_http_moe_gen_lit(g, "reason");
        ngx_http_moe_gen_str(g, inst->failed.data, inst->failed.len);
    }

    yajl_gen_map_close(g);

    if (inst->eng) {
        return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
    }

    if (inst->state != NGX_HTTP_MOE_INST_FAILED
        && ngx_http_moe_set_retry_after(r, ngx_http_moe_retry_after(inst))
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_moe_send_gen(r, NGX_HTTP_SERVICE_UNAVAILABLE, g);
}


/* GET /v1/models: every instance (one still loading without details) */

ngx_int_t
ngx_http_moe_models(ngx_http_request_t *r)
{
    yajl_gen                   g;
    ngx_uint_t                 i;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "object");
    ngx_http_moe_gen_lit(g, "list");
    ngx_http_moe_gen_lit(g, "data");
    yajl_gen_array_open(g);

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        if (inst->eng) {
            ngx_http_moe_gen_model(g, inst->eng->info);
            continue;
        }

        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "id");
        ngx_http_moe_gen_str(g, inst->name.data, inst->name.len);
        ngx_http_moe_gen_lit(g, "object");
        ngx_http_moe_gen_lit(g, "model");
        ngx_http_moe_gen_lit(g, "owned_by");
        ngx_http_moe_gen_lit(g, "localmoe");
        ngx_http_moe_gen_lit(g, "status");
        ngx_http_moe_gen_cstr(g, ngx_http_moe_inst_state(inst));
        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


/* GET /v1/models/{id} */

ngx_int_t
ngx_http_moe_model(ngx_http_request_t *r)
{
    size_t                     prefix;
    ngx_str_t                  id;
    yajl_gen                   g;
    ngx_http_moe_err_t         err;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    prefix = sizeof("/v1/models/") - 1;

    id.data = r->uri.data + prefix;
    id.len = r->uri.len - prefix;

    if (ngx_http_moe_check_name(r, &id, &err) != NGX_OK) {
        return ngx_http_moe_send_err(r, &err);
    }

    inst = ngx_http_moe_inst_find(mcf, id.data, id.len);

    if (inst == NULL || inst->eng == NULL) {
        return ngx_http_moe_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                       NULL, "the model \"%V\" is not "
                                       "serving yet", &id);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_moe_gen_model(g, inst->eng->info);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


static void
ngx_http_moe_gen_model(yajl_gen g, const moe_model_info_t *info)
{
    u_char  *root, *p, *last;

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "id");
    ngx_http_moe_gen_cstr(g, info->served_name);
    ngx_http_moe_gen_lit(g, "object");
    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_int(g, "created", info->created);
    ngx_http_moe_gen_lit(g, "owned_by");
    ngx_http_moe_gen_lit(g, "localmoe");
    /* the model directory's name: an absolute path tells strangers how
     * the disk is laid out */

    root = (u_char *) info->model_path;
    last = root + ngx_strlen(root);

    while (last > root + 1 && last[-1] == '/') {
        last--;
    }

    for (p = last; p > root && p[-1] != '/'; p--) { /* void */ }

    ngx_http_moe_gen_lit(g, "root");
    ngx_http_moe_gen_str(g, p, last - p);
    ngx_http_moe_gen_int(g, "max_model_len", info->max_model_len);
    /* the routing actually used (model.top_k_experts may override it) */
    ngx_http_moe_gen_int(g, "num_experts", info->n_experts);
    ngx_http_moe_gen_int(g, "top_k_experts", info->top_k);
    yajl_gen_map_close(g);
}


/*
 * The instance stats are about: ?model=NAME, else the first instance that
 * serves (the handler answers 503 before this while none does).
 */

static ngx_http_moe_inst_t *
ngx_http_moe_stats_inst(ngx_http_request_t *r)
{
    ngx_str_t                  name;
    ngx_uint_t                 i;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (ngx_http_arg(r, (u_char *) "model", 5, &name) == NGX_OK) {
        inst = ngx_http_moe_inst_find(mcf, name.data, name.len);
        if (inst != NULL && inst->eng != NULL) {
            return inst;
        }
    }

    for (i = 0; i < mcf->n_inst; i++) {
        if (mcf->inst[i].eng != NULL) {
            return &mcf->inst[i];
        }
    }

    return NULL;
}


/* an instance's engines: the current one, those finishing after a
 * switch, those destroyed and the weights they freed */

static void
ngx_http_moe_gen_engines(yajl_gen g, ngx_http_moe_inst_t *inst)
{
    int64_t              n, bytes;
    ngx_http_moe_eng_t  *eng;

    n = 0;
    bytes = 0;

    for (eng = inst->retired; eng; eng = eng->next) {
        n++;
        bytes += eng->weights_bytes;
    }

    ngx_http_moe_gen_lit(g, "engines");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "loads", inst->loads);
    ngx_http_moe_gen_int(g, "switches", inst->switches);
    ngx_http_moe_gen_int(g, "switch_failures", inst->switch_failures);
    ngx_http_moe_gen_int(g, "retiring", n);
    ngx_http_moe_gen_int(g, "retiring_weights_bytes", bytes);
    ngx_http_moe_gen_int(g, "freed", inst->engines_freed);
    ngx_http_moe_gen_int(g, "freed_weights_bytes", inst->weights_freed);
    ngx_http_moe_gen_int(g, "last_load_ms", (int64_t) inst->last_load_ms);
    yajl_gen_map_close(g);
}


static void
ngx_http_moe_gen_memory(yajl_gen g, ngx_http_moe_inst_t *inst)
{
    double       usage;
    moe_stats_t  st;

    moe_engine_stats(inst->eng->engine, &st);

    usage = st.kv_blocks_total
            ? (double) st.kv_blocks_used / (double) st.kv_blocks_total : 0.0;

    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_cstr(g, inst->eng->info->served_name);

    ngx_http_moe_gen_lit(g, "kv_cache");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "blocks_total", st.kv_blocks_total);
    ngx_http_moe_gen_int(g, "blocks_used", st.kv_blocks_used);
    ngx_http_moe_gen_int(g, "blocks_free",
                         st.kv_blocks_total - st.kv_blocks_used);
    ngx_http_moe_gen_int(g, "blocks_cached", st.kv_blocks_cached);
    /* a pool that still grows (weights imported beside the old worker) */
    ngx_http_moe_gen_int(g, "blocks_pending", st.kv_blocks_pending);
    ngx_http_moe_gen_int(g, "block_size", st.block_size);
    ngx_http_moe_gen_int(g, "bytes_per_block", st.kv_bytes_per_block);
    ngx_http_moe_gen_lit(g, "dtype");
    ngx_http_moe_gen_cstr(g, inst->eng->info->kv_cache_dtype);
    ngx_http_moe_gen_double(g, "usage", usage);
    yajl_gen_map_close(g);

    ngx_http_moe_gen_int(g, "weights_bytes", st.weights_bytes);

    ngx_http_moe_gen_lit(g, "sequences");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "running", st.seqs_running);
    ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
    yajl_gen_map_close(g);

    ngx_http_moe_gen_engines(g, inst);
}


/* GET /v1/stats/memory: the (first or ?model=) instance's figures at the
 * top, every instance's in "instances" */

ngx_int_t
ngx_http_moe_stats_memory(ngx_http_request_t *r)
{
    yajl_gen                   g;
    ngx_uint_t                 i;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    inst = ngx_http_moe_stats_inst(r);
    if (inst == NULL) {
        return ngx_http_moe_inst_unavailable(r, mcf);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);

    ngx_http_moe_gen_memory(g, inst);

    ngx_http_moe_gen_lit(g, "instances");
    yajl_gen_array_open(g);

    for (i = 0; i < mcf->n_inst; i++) {
        yajl_gen_map_open(g);

        if (mcf->inst[i].eng) {
            ngx_http_moe_gen_memory(g, &mcf->inst[i]);

        } else {
            ngx_http_moe_gen_lit(g, "model");
            ngx_http_moe_gen_str(g, mcf->inst[i].name.data,
                                 mcf->inst[i].name.len);
            ngx_http_moe_gen_engines(g, &mcf->inst[i]);
        }

        ngx_http_moe_gen_lit(g, "status");
        ngx_http_moe_gen_cstr(g, ngx_http_moe_inst_state(&mcf->inst[i]));
        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


ngx_int_t
ngx_http_moe_stats_performance(ngx_http_request_t *r)
{
    int                        n;
    double                     uptime, busy;
    size_t                     total;
    int64_t                   *counts;
    yajl_gen                   g;
    ngx_int_t                  l, e, layers, experts;
    ngx_uint_t                 i;
    moe_stats_t                st;
    ngx_http_moe_inst_t       *inst, *in;
    const moe_model_info_t    *info;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    inst = ngx_http_moe_stats_inst(r);
    if (inst == NULL) {
        return ngx_http_moe_inst_unavailable(r, mcf);
    }

    info = inst->eng->info;

    moe_engine_stats(inst->eng->engine, &st);

    uptime = (double) (ngx_time() - info->created);
    if (uptime < 1.0) {
        uptime = 1.0;
    }

    busy = (double) st.busy_ns / 1e9;

    layers = info->n_layers > 0 ? info->n_layers : 0;
    experts = info->n_experts > 0 ? info->n_experts : 0;
    total = (size_t) (layers * experts);

    counts = ngx_pcalloc(r->pool, (total + 1) * sizeof(int64_t));
    if (counts == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    n = total ? moe_engine_expert_counts(inst->eng->engine, counts, total)
              : 0;
    if (n < 0) {
        n = 0;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_cstr(g, info->served_name);
    ngx_http_moe_gen_lit(g, "backend");
    ngx_http_moe_gen_cstr(g, info->backend);
    ngx_http_moe_gen_double(g, "uptime_s", uptime);

    ngx_http_moe_gen_lit(g, "requests");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "submitted", st.requests_submitted);
    ngx_http_moe_gen_int(g, "finished", st.requests_finished);
    ngx_http_moe_gen_int(g, "cancelled", st.requests_cancelled);
    ngx_http_moe_gen_int(g, "running", st.seqs_running);
    ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
    ngx_http_moe_gen_int(g, "rejected", (int64_t) inst->admit.rejected);
    yajl_gen_map_close(g);

    /* admission control (ngx_http_moe_admit.c) */
    ngx_http_moe_gen_lit(g, "admission");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "waiting_requests",
                         (int64_t) inst->admit.waiting);
    ngx_http_moe_gen_int(g, "waiting_tokens",
                         (int64_t) inst->admit.waiting_tokens);
    ngx_http_moe_gen_int(g, "max_waiting_requests",
                         (int64_t) inst->admit.max_waiting);
    ngx_http_moe_gen_int(g, "max_waiting_tokens",
                         (int64_t) inst->admit.max_tokens);
    ngx_http_moe_gen_int(g, "rejected", (int64_t) inst->admit.rejected);
    ngx_http_moe_gen_int(g, "retry_after_s",
                         (int64_t) ngx_http_moe_retry_after(inst));
    yajl_gen_map_close(g);

    ngx_http_moe_gen_lit(g, "tokens");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "prompt", st.prompt_tokens_total);
    ngx_http_moe_gen_int(g, "generated", st.generated_tokens_total);
    ngx_http_moe_gen_int(g, "cached", st.cached_tokens_total);
    yajl_gen_map_close(g);

    ngx_http_moe_gen_int(g, "steps", st.steps);
    ngx_http_moe_gen_int(g, "preemptions", st.preemptions);
    ngx_http_moe_gen_int(g, "swap_outs", st.swap_outs);
    ngx_http_moe_gen_int(g, "swap_ins", st.swap_ins);

    /* stall-free batching: steps whose prefill the cost model cut, and the
     * model (ns = c0 + c1 tokens + c2 attention pairs / 1024) */
    ngx_http_moe_gen_lit(g, "stall_free");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "prefill_limited_steps",
                         st.prefill_limited_steps);
    ngx_http_moe_gen_double(g, "step_cost_c0_ns", st.step_cost_ns[0]);
    ngx_http_moe_gen_double(g, "step_cost_c1_ns", st.step_cost_ns[1]);
    ngx_http_moe_gen_double(g, "step_cost_c2_ns", st.step_cost_ns[2]);
    yajl_gen_map_close(g);
    ngx_http_moe_gen_double(g, "busy_s", busy);
    ngx_http_moe_gen_double(g, "busy_fraction",
                            busy / uptime > 1.0 ? 1.0 : busy / uptime);

    ngx_http_moe_gen_lit(g, "throughput");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_double(g, "generated_tokens_per_s",
                            (double) st.generated_tokens_total / uptime);
    ngx_http_moe_gen_double(g, "prompt_tokens_per_s",
                            (double) st.prompt_tokens_total / uptime);
    ngx_http_moe_gen_double(g, "generated_tokens_per_busy_s",
                            busy > 0 ? st.generated_tokens_total / busy : 0);
    yajl_gen_map_close(g);

    ngx_http_moe_gen_lit(g, "experts");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "layers", layers);
    ngx_http_moe_gen_int(g, "experts", experts);
    ngx_http_moe_gen_int(g, "top_k", info->top_k);
    ngx_http_moe_gen_lit(g, "counts");
    yajl_gen_array_open(g);

    if ((size_t) n == total) {
        for (l = 0; l < layers; l++) {
            yajl_gen_array_open(g);

            for (e = 0; e < experts; e++) {
                yajl_gen_integer(g, counts[l * experts + e]);
            }

            yajl_gen_array_close(g);
        }
    }

    yajl_gen_array_close(g);
    ngx_http_moe_gen_rank_load(g, inst->eng->engine);
    yajl_gen_map_close(g);

    /* every instance's request counters and engines */
    ngx_http_moe_gen_lit(g, "instances");
    yajl_gen_array_open(g);

    for (i = 0; i < mcf->n_inst; i++) {
        in = &mcf->inst[i];

        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "model");
        ngx_http_moe_gen_str(g, in->name.data, in->name.len);
        ngx_http_moe_gen_lit(g, "status");
        ngx_http_moe_gen_cstr(g, ngx_http_moe_inst_state(in));

        if (in->eng) {
            moe_engine_stats(in->eng->engine, &st);
            ngx_http_moe_gen_int(g, "submitted", st.requests_submitted);
            ngx_http_moe_gen_int(g, "finished", st.requests_finished);
            ngx_http_moe_gen_int(g, "running", st.seqs_running);
            ngx_http_moe_gen_int(g, "generated_tokens",
                                 st.generated_tokens_total);
        }

        ngx_http_moe_gen_int(g, "rejected", (int64_t) in->admit.rejected);
        ngx_http_moe_gen_int(g, "waiting_requests",
                             (int64_t) in->admit.waiting);
        ngx_http_moe_gen_engines(g, in);
        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);

    yajl_gen_map_close(g);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


/* the metrics of /metrics, in the order of ngx_http_moe_metric_values() */

static ngx_http_moe_metric_t  ngx_http_moe_metric_list[] = {
    { "instance_up", "gauge",
      "1 when the instance serves, 0 while it loads or failed." },
    { "requests_submitted_total", "counter",
      "Requests accepted by the engine." },
    { "requests_finished_total", "counter", "Requests that ended." },
    { "requests_cancelled_total", "counter",
      "Requests cancelled (client gone or stop string)." },
    { "requests_rejected_total", "counter",
      "Requests answered 429 by admission control." },
    { "admission_waiting_requests", "gauge",
      "Requests admitted, not yet running." },
    { "admission_waiting_tokens", "gauge",
      "Prompt tokens of requests admitted, not yet running." },
    { "prompt_tokens_total", "counter", "Prompt tokens processed." },
    { "generation_tokens_total", "counter", "Tokens generated." },
    { "prefix_cache_hit_tokens_total", "counter",
      "Prompt tokens served from the prefix cache." },
    { "engine_steps_total", "counter", "Scheduler steps run." },
    { "engine_busy_nanoseconds_total", "counter",
      "Engine time spent in forward and sampling." },
    { "preemptions_total", "counter",
      "Sequences preempted for lack of KV blocks (recomputed or "
      "swapped)." },
    { "swap_outs_total", "counter",
      "Sequences whose KV blocks were swapped to host memory." },
    { "swap_slots_used", "gauge", "Host swap slots holding KV blocks." },
    { "backend_sampled_tokens_total", "counter",
      "Tokens of non-greedy requests drawn by the backend (on the GPU "
      "for cuda)." },
    { "prefill_limited_steps_total", "counter",
      "Steps whose prefill chunks stall-free batching cut to keep decodes "
      "at pace." },
    { "num_requests_running", "gauge", "Sequences running." },
    { "num_requests_waiting", "gauge", "Sequences waiting." },
    { "kv_cache_blocks_total", "gauge", "KV cache blocks." },
    { "kv_cache_blocks_used", "gauge", "KV cache blocks in use." },
    { "kv_cache_blocks_cached", "gauge",
      "Free KV cache blocks holding a cached prefix." },
    { "weights_bytes", "gauge", "Bytes of model weights." },
    { "submit_ring_free", "gauge", "Free slots in the submit ring." },
    { "engines_retiring", "gauge",
      "Old engines finishing their requests after a switch." },
    { "engines_freed_total", "counter",
      "Old engines destroyed after a switch." },
    { "model_switches_total", "counter", "Model switches done." },
    { NULL, NULL, NULL }
};


static void
ngx_http_moe_metric_values(ngx_http_moe_inst_t *inst, int64_t *v)
{
    int64_t              n;
    moe_stats_t          st;
    ngx_http_moe_eng_t  *eng;

    ngx_memzero(&st, sizeof(moe_stats_t));

    if (inst->eng) {
        moe_engine_stats(inst->eng->engine, &st);
    }

    n = 0;

    for (eng = inst->retired; eng; eng = eng->next) {
        n++;
    }

    *v++ = inst->eng ? 1 : 0;
    *v++ = st.requests_submitted;
    *v++ = st.requests_finished;
    *v++ = st.requests_cancelled;
    *v++ = (int64_t) inst->admit.rejected;
    *v++ = (int64_t) inst->admit.waiting;
    *v++ = (int64_t) inst->admit.waiting_tokens;
    *v++ = st.prompt_tokens_total;
    *v++ = st.generated_tokens_total;
    *v++ = st.cached_tokens_total;
    *v++ = st.steps;
    *v++ = st.busy_ns;
    *v++ = st.preemptions + st.swap_outs;
    *v++ = st.swap_outs;
    *v++ = st.swap_slots_used;
    *v++ = st.backend_sampled_tokens;
    *v++ = st.prefill_limited_steps;
    *v++ = st.seqs_running;
    *v++ = st.seqs_waiting;
    *v++ = st.kv_blocks_total;
    *v++ = st.kv_blocks_used;
    *v++ = st.kv_blocks_cached;
    *v++ = st.weights_bytes;
    *v++ = st.submit_ring_free;
    *v++ = n;
    *v++ = inst->engines_freed;
    *v = inst->switches;
}


/* GET /metrics: Prometheus text, one sample per instance, model="..." */

/*
 * Expert parallelism: "rank_load", the (token, expert) rows each rank's
 * experts computed, only when the engine places whole experts on ranks
 * (so a skewed router shows as one busy GPU).
 */
static void
ngx_http_moe_gen_rank_load(yajl_gen g, moe_engine_t *engine)
{
    int      n, i;
    int64_t  load[64];

    n = moe_engine_rank_load(engine, load, 64);
    if (n <= 0) {
        return;
    }

    ngx_http_moe_gen_lit(g, "rank_load");
    yajl_gen_array_open(g);

    for (i = 0; i < n; i++) {
        yajl_gen_integer(g, load[i]);
    }

    yajl_gen_array_close(g);
}


ngx_int_t
ngx_http_moe_metrics(ngx_http_request_t *r)
{
    u_char                    *p, *last, *start, *q;
    size_t                     size, names;
    int64_t                   *values;
    ngx_str_t                 *model;
    ngx_uint_t                 i, k, n_metrics;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_metric_t     *m;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    for (n_metrics = 0; ngx_http_moe_metric_list[n_metrics].name;
         n_metrics++)
    {
        /* void */
    }

    model = ngx_pcalloc(r->pool, (mcf->n_inst + 1) * sizeof(ngx_str_t));
    values = ngx_pcalloc(r->pool,
                         (mcf->n_inst + 1) * n_metrics * sizeof(int64_t));
    if (model == NULL || values == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    names = 0;

    for (i = 0; i < mcf->n_inst; i++) {
        inst = &mcf->inst[i];

        /* the label value: Prometheus escapes \ " and newline */

        model[i].data = ngx_pnalloc(r->pool, 2 * inst->name.len + 1);
        if (model[i].data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        last = model[i].data;

        for (q = inst->name.data; q < inst->name.data + inst->name.len; q++)
        {
            if (*q == '\\' || *q == '"' || *q == '\n') {
                *last++ = '\\';
                *last++ = (*q == '\n') ? 'n' : *q;

            } else {
                *last++ = *q;
            }
        }

        model[i].len = last - model[i].data;
        names += model[i].len;

        ngx_http_moe_metric_values(inst, &values[i * n_metrics]);
    }

    size = n_metrics * (512 + mcf->n_inst * 64) + n_metrics * names;

    start = ngx_pnalloc(r->pool, size);
    if (start == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = start;
    last = start + size;

    for (k = 0; k < n_metrics; k++) {
        m = &ngx_http_moe_metric_list[k];

        p = ngx_slprintf(p, last,
                         "# HELP localmoe_%s %s\n# TYPE localmoe_%s %s\n",
                         m->name, m->help, m->name, m->type);

        for (i = 0; i < mcf->n_inst; i++) {
            p = ngx_slprintf(p, last, "localmoe_%s{model=\"%V\"} %L\n",
                             m->name, &model[i], values[i * n_metrics + k]);
        }
    }

    return ngx_http_moe_send_text(r, NGX_HTTP_OK,
                                  &ngx_http_moe_prometheus_type, start,
                                  p - start);
}


/*
 * POST /tokenize: {"prompt": ...} or {"messages": [...]}; a pool thread
 * renders and encodes, ngx_http_moe_tokenize_done answers.
 */

ngx_int_t
ngx_http_moe_tokenize(ngx_http_request_t *r, yajl_val root)
{
    ngx_int_t             rc;
    yajl_val              prompt, messages, v;
    ngx_uint_t            special, gen_prompt;
    ngx_http_moe_err_t    err;
    ngx_http_moe_text_t  *t;

    rc = ngx_http_moe_check_model(r, root, &err);
    if (rc != NGX_OK) {
        return ngx_http_moe_send_err(r, &err);
    }

    prompt = ngx_http_moe_json_get(root, "prompt");
    messages = ngx_http_moe_json_get(root, "messages");

    if ((prompt == NULL) == (messages == NULL)) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "prompt",
                                       "give either prompt or messages");
    }

    special = prompt ? 1 : 0;

    v = ngx_http_moe_json_get(root, "add_special_tokens");
    if (v && ngx_http_moe_json_bool(v, &special) != NGX_OK) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST,
                                       "add_special_tokens",
                                       "add_special_tokens must be a "
                                       "boolean");
    }

    t = ngx_http_moe_text_create(r, NGX_HTTP_MOE_TEXT_ENCODE);
    if (t == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    t->add_special_tokens = special;

    if (prompt) {
        if (!YAJL_IS_STRING(prompt)) {
            return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "prompt",
                                           "prompt must be a string");
        }

        t->text = (u_char *) prompt->u.string;
        t->len = ngx_strlen(prompt->u.string);

    } else {
        gen_prompt = 1;

        v = ngx_http_moe_json_get(root, "add_generation_prompt");
        if (v && ngx_http_moe_json_bool(v, &gen_prompt) != NGX_OK) {
            return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST,
                                           "add_generation_prompt",
                                           "add_generation_prompt must be a "
                                           "boolean");
        }

        rc = ngx_http_moe_messages(r, messages, &t->msgs, &t->n_msgs, &err);

        if (rc == NGX_DECLINED) {
            return ngx_http_moe_send_err(r, &err);
        }

        if (rc != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /* tools, as vLLM's /tokenize takes them: the prompt a chat
         * completion with the same fields would get */
        rc = ngx_http_moe_info_tools(r, root, messages, t, &err);

        if (rc == NGX_DECLINED) {
            return ngx_http_moe_send_err(r, &err);
        }

        if (rc != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        t->add_generation_prompt = gen_prompt;
    }

    return ngx_http_moe_info_post(r, t, ngx_http_moe_tokenize_done);
}


static ngx_int_t
ngx_http_moe_info_tools(ngx_http_request_t *r, yajl_val root,
    yajl_val messages, ngx_http_moe_text_t *t, ngx_http_moe_err_t *err)
{
    ngx_int_t              rc;
    ngx_http_moe_tools_t   tl;

    rc = ngx_http_moe_tools_parse(r, root, 1, &tl, err);
    if (rc != NGX_OK) {
        return rc;
    }


    /* (no guide: nothing is generated here) */
    return ngx_http_moe_tools_prompt(r, messages, t->msgs, &tl, t, err);
}


static void
ngx_http_moe_tokenize_done(ngx_http_request_t *r, ngx_http_moe_text_t *t)
{
    size_t                     i, n;
    int32_t                   *ids;
    yajl_gen                   g;
    ngx_int_t                  rc;
    ngx_http_moe_err_t         err;

    rc = ngx_http_moe_text_ids(r, t, &ids, &n, &err);

    if (rc == NGX_DECLINED) {
        ngx_http_finalize_request(r, ngx_http_moe_send_err(r, &err));
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "count", (int64_t) n);
    ngx_http_moe_gen_int(g, "max_model_len",
                         ngx_http_moe_model_info(r)->max_model_len);
    ngx_http_moe_gen_lit(g, "tokens");
    yajl_gen_array_open(g);

    for (i = 0; i < n; i++) {
        yajl_gen_integer(g, ids[i]);
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);

    ngx_http_finalize_request(r, ngx_http_moe_send_gen(r, NGX_HTTP_OK, g));
}


/* POST /detokenize: {"tokens": [...]}; decoded on a pool thread */

ngx_int_t
ngx_http_moe_detokenize(ngx_http_request_t *r, yajl_val root)
{
    int                        vocab;
    size_t                     n;
    int32_t                   *ids;
    ngx_int_t                  rc;
    yajl_val                   v;
    ngx_http_moe_err_t         err;
    ngx_http_moe_text_t       *t;

    rc = ngx_http_moe_check_model(r, root, &err);
    if (rc != NGX_OK) {
        return ngx_http_moe_send_err(r, &err);
    }

    v = ngx_http_moe_json_get(root, "tokens");

    if (v == NULL) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "tokens",
                                       "tokens is required");
    }

    t = ngx_http_moe_text_create(r, NGX_HTTP_MOE_TEXT_DECODE);
    if (t == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    vocab = ngx_http_moe_model_info(r)->vocab_size;

    rc = ngx_http_moe_json_ids(v, vocab, &ids, &n, r->pool);

    if (rc == NGX_DECLINED) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "tokens",
                                       "tokens must be an array of token ids "
                                       "in [0, %d)", vocab);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    t->ids = ids;
    t->n_ids = n;

    return ngx_http_moe_info_post(r, t, ngx_http_moe_detokenize_done);
}


/*
 * Hand /tokenize's or /detokenize's text work to the thread pool: NGX_DONE
 * (done answers), else the answer now (400 body, 500).
 */

static ngx_int_t
ngx_http_moe_info_post(ngx_http_request_t *r, ngx_http_moe_text_t *t,
    ngx_http_moe_text_done_pt done)
{
    ngx_int_t           rc;
    ngx_http_moe_err_t  err;

    rc = ngx_http_moe_text_post(r, t, done, NULL, &err);

    if (rc == NGX_DECLINED) {
        return ngx_http_moe_send_err(r, &err);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_DONE;
}


static void
ngx_http_moe_detokenize_done(ngx_http_request_t *r, ngx_http_moe_text_t *t)
{
    yajl_gen   g;
    ngx_int_t  rc;

    if (t->rc != MOE_OK) {
        rc = ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "tokens",
                                     "cannot decode tokens: %s",
                                     moe_strerror(t->rc));
        ngx_http_finalize_request(r, rc);
        return;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "prompt");
    ngx_http_moe_gen_str(g, t->out_text ? t->out_text : "", t->out_len);
    yajl_gen_map_close(g);

    ngx_http_moe_text_free(t);

    ngx_http_finalize_request(r, ngx_http_moe_send_gen(r, NGX_HTTP_OK, g));
}


/*
 * The "model" of a POST body names the instance the request goes to (the
 * first instance without it): the request is routed there (it holds that
 * engine until it ends).  404 model_not_found for an unknown name, 503
 * (with Retry-After while loading) for an instance without an engine.
 */

ngx_int_t
ngx_http_moe_check_model(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_err_t *err)
{
    yajl_val                   v;
    ngx_str_t                  name;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_inst_t       *inst;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);
    ctx = ngx_http_moe_get_ctx(r);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (ctx->eng != NULL) {
        return NGX_OK;
    }

    v = ngx_http_moe_json_get(root, "model");

    if (v == NULL) {
        if (mcf->n_inst == 0) {
            return ngx_http_moe_fail(err, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                                     "no engine is running");
        }

        return ngx_http_moe_inst_route(r, ctx, &mcf->inst[0], err);
    }

    if (!YAJL_IS_STRING(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "model",
                                 "model must be a string");
    }

    name.data = (u_char *) v->u.string;
    name.len = ngx_strlen(v->u.string);

    if (ngx_http_moe_check_name(r, &name, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    inst = ngx_http_moe_inst_find(mcf, name.data, name.len);

    return ngx_http_moe_inst_route(r, ctx, inst, err);
}


static ngx_int_t
ngx_http_moe_check_name(ngx_http_request_t *r, ngx_str_t *name,
    ngx_http_moe_err_t *err)
{
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (ngx_http_moe_inst_find(mcf, name->data, name->len) != NULL) {
        return NGX_OK;
    }

    (void) ngx_http_moe_fail(err, NGX_HTTP_NOT_FOUND, "model",
                             "The model `%V` does not exist.", name);
    err->code = "model_not_found";

    return NGX_DECLINED;
}


static void
ngx_http_moe_gen_int(yajl_gen g, const char *key, int64_t n)
{
    ngx_http_moe_gen_cstr(g, key);
    yajl_gen_integer(g, (long long) n);
}


/* three decimals: yajl_gen_double() prints 17 significant digits */

static void
ngx_http_moe_gen_double(yajl_gen g, const char *key, double d)
{
    u_char  *p;
    u_char   buf[NGX_INT64_LEN + 8];

    ngx_http_moe_gen_cstr(g, key);

    if (d != d || d > 9.0e15 || d < -9.0e15) {
        yajl_gen_null(g);
        return;
    }

    p = ngx_snprintf(buf, sizeof(buf), "%.3f", d);

    yajl_gen_number(g, (const char *) buf, p - buf);
}
