
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
static u_char *ngx_http_moe_metric(u_char *p, u_char *last,
    const char *name, const char *type, const char *help, ngx_str_t *model,
    int64_t value);
static ngx_int_t ngx_http_moe_check_name(ngx_http_request_t *r,
    ngx_str_t *name, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_info_post(ngx_http_request_t *r,
    ngx_http_moe_text_t *t, ngx_http_moe_text_done_pt done);
static void ngx_http_moe_tokenize_done(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);
static void ngx_http_moe_detokenize_done(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);


static ngx_str_t  ngx_http_moe_prometheus_type =
    ngx_string("text/plain; version=0.0.4; charset=utf-8");


ngx_int_t
ngx_http_moe_health(ngx_http_request_t *r)
{
    yajl_gen                   g;
    moe_stats_t                st;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (mcf->engine == NULL) {
        /* the engine is made before the worker accepts: never "loading" */
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "status");
        ngx_http_moe_gen_lit(g, "failed");
        ngx_http_moe_gen_lit(g, "reason");
        if (mcf->failed.len) {
            ngx_http_moe_gen_str(g, mcf->failed.data, mcf->failed.len);
        } else {
            ngx_http_moe_gen_lit(g, "no engine is running");
        }
        yajl_gen_map_close(g);

        return ngx_http_moe_send_gen(r, NGX_HTTP_SERVICE_UNAVAILABLE, g);
    }

    moe_engine_stats(mcf->engine, &st);

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "status");
    ngx_http_moe_gen_lit(g, "ok");
    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_cstr(g, mcf->info->served_name);
    ngx_http_moe_gen_int(g, "running", st.seqs_running);
    ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
    ngx_http_moe_gen_int(g, "kv_blocks_used", st.kv_blocks_used);
    ngx_http_moe_gen_int(g, "kv_blocks_total", st.kv_blocks_total);
    yajl_gen_map_close(g);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


ngx_int_t
ngx_http_moe_models(ngx_http_request_t *r)
{
    yajl_gen                   g;
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
    ngx_http_moe_gen_model(g, mcf->info);
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
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    prefix = sizeof("/v1/models/") - 1;

    id.data = r->uri.data + prefix;
    id.len = r->uri.len - prefix;

    if (ngx_http_moe_check_name(r, &id, &err) != NGX_OK) {
        return ngx_http_moe_send_err(r, &err);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_moe_gen_model(g, mcf->info);

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


ngx_int_t
ngx_http_moe_stats_memory(ngx_http_request_t *r)
{
    double                     usage;
    yajl_gen                   g;
    moe_stats_t                st;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    moe_engine_stats(mcf->engine, &st);

    usage = st.kv_blocks_total
            ? (double) st.kv_blocks_used / (double) st.kv_blocks_total : 0.0;

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "kv_cache");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "blocks_total", st.kv_blocks_total);
    ngx_http_moe_gen_int(g, "blocks_used", st.kv_blocks_used);
    ngx_http_moe_gen_int(g, "blocks_free",
                         st.kv_blocks_total - st.kv_blocks_used);
    ngx_http_moe_gen_int(g, "blocks_cached", st.kv_blocks_cached);
    ngx_http_moe_gen_int(g, "block_size", st.block_size);
    ngx_http_moe_gen_int(g, "bytes_per_block", st.kv_bytes_per_block);
    ngx_http_moe_gen_double(g, "usage", usage);
    yajl_gen_map_close(g);

    ngx_http_moe_gen_int(g, "weights_bytes", st.weights_bytes);

    ngx_http_moe_gen_lit(g, "sequences");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "running", st.seqs_running);
    ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
    yajl_gen_map_close(g);

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
    moe_stats_t                st;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    moe_engine_stats(mcf->engine, &st);

    uptime = (double) (ngx_time() - mcf->info->created);
    if (uptime < 1.0) {
        uptime = 1.0;
    }

    busy = (double) st.busy_ns / 1e9;

    layers = mcf->info->n_layers > 0 ? mcf->info->n_layers : 0;
    experts = mcf->info->n_experts > 0 ? mcf->info->n_experts : 0;
    total = (size_t) (layers * experts);

    counts = ngx_pcalloc(r->pool, (total + 1) * sizeof(int64_t));
    if (counts == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    n = total ? moe_engine_expert_counts(mcf->engine, counts, total) : 0;
    if (n < 0) {
        n = 0;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_cstr(g, mcf->info->served_name);
    ngx_http_moe_gen_lit(g, "backend");
    ngx_http_moe_gen_cstr(g, mcf->info->backend);
    ngx_http_moe_gen_double(g, "uptime_s", uptime);

    ngx_http_moe_gen_lit(g, "requests");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "submitted", st.requests_submitted);
    ngx_http_moe_gen_int(g, "finished", st.requests_finished);
    ngx_http_moe_gen_int(g, "cancelled", st.requests_cancelled);
    ngx_http_moe_gen_int(g, "running", st.seqs_running);
    ngx_http_moe_gen_int(g, "waiting", st.seqs_waiting);
    ngx_http_moe_gen_int(g, "rejected", (int64_t) mcf->admit.rejected);
    yajl_gen_map_close(g);

    /* admission control (ngx_http_moe_admit.c) */
    ngx_http_moe_gen_lit(g, "admission");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_int(g, "waiting_requests",
                         (int64_t) mcf->admit.waiting);
    ngx_http_moe_gen_int(g, "waiting_tokens",
                         (int64_t) mcf->admit.waiting_tokens);
    ngx_http_moe_gen_int(g, "max_waiting_requests",
                         (int64_t) mcf->admit.max_waiting);
    ngx_http_moe_gen_int(g, "max_waiting_tokens",
                         (int64_t) mcf->admit.max_tokens);
    ngx_http_moe_gen_int(g, "rejected", (int64_t) mcf->admit.rejected);
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
    ngx_http_moe_gen_int(g, "top_k", mcf->info->top_k);
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
    ngx_http_moe_gen_rank_load(g, mcf->engine);
    yajl_gen_map_close(g);

    yajl_gen_map_close(g);

    return ngx_http_moe_send_gen(r, NGX_HTTP_OK, g);
}


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
    u_char                    *p, *last, *start;
    size_t                     size;
    ngx_str_t                  model;
    moe_stats_t                st;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    moe_engine_stats(mcf->engine, &st);

    /* the label value: Prometheus escapes \ " and newline */

    model.len = 0;

    for (p = (u_char *) mcf->info->served_name; *p; p++) {
        model.len += (*p == '\\' || *p == '"' || *p == '\n') ? 2 : 1;
    }

    model.data = ngx_pnalloc(r->pool, model.len);
    if (model.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    last = model.data;

    for (p = (u_char *) mcf->info->served_name; *p; p++) {
        if (*p == '\\' || *p == '"' || *p == '\n') {
            *last++ = '\\';
            *last++ = (*p == '\n') ? 'n' : *p;

        } else {
            *last++ = *p;
        }
    }

    size = 30 * (256 + model.len);     /* 22 metrics of <= 256 + name */

    start = ngx_pnalloc(r->pool, size);
    if (start == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = start;
    last = start + size;

    p = ngx_http_moe_metric(p, last, "requests_submitted_total", "counter",
                            "Requests accepted by the engine.", &model,
                            st.requests_submitted);
    p = ngx_http_moe_metric(p, last, "requests_finished_total", "counter",
                            "Requests that ended.", &model,
                            st.requests_finished);
    p = ngx_http_moe_metric(p, last, "requests_cancelled_total", "counter",
                            "Requests cancelled (client gone or stop "
                            "string).", &model, st.requests_cancelled);
    p = ngx_http_moe_metric(p, last, "requests_rejected_total", "counter",
                            "Requests answered 429 by admission control.",
                            &model, (int64_t) mcf->admit.rejected);
    p = ngx_http_moe_metric(p, last, "admission_waiting_requests", "gauge",
                            "Requests admitted, not yet running.", &model,
                            (int64_t) mcf->admit.waiting);
    p = ngx_http_moe_metric(p, last, "admission_waiting_tokens", "gauge",
                            "Prompt tokens of requests admitted, not yet "
                            "running.", &model,
                            (int64_t) mcf->admit.waiting_tokens);
    p = ngx_http_moe_metric(p, last, "prompt_tokens_total", "counter",
                            "Prompt tokens processed.", &model,
                            st.prompt_tokens_total);
    p = ngx_http_moe_metric(p, last, "generation_tokens_total", "counter",
                            "Tokens generated.", &model,
                            st.generated_tokens_total);
    p = ngx_http_moe_metric(p, last, "prefix_cache_hit_tokens_total",
                            "counter", "Prompt tokens served from the "
                            "prefix cache.", &model, st.cached_tokens_total);
    p = ngx_http_moe_metric(p, last, "engine_steps_total", "counter",
                            "Scheduler steps run.", &model, st.steps);
    p = ngx_http_moe_metric(p, last, "engine_busy_nanoseconds_total",
                            "counter", "Engine time spent in forward and "
                            "sampling.", &model, st.busy_ns);
    p = ngx_http_moe_metric(p, last, "preemptions_total", "counter",
                            "Sequences preempted for lack of KV blocks "
                            "(recomputed or swapped).",
                            &model, st.preemptions + st.swap_outs);
    p = ngx_http_moe_metric(p, last, "swap_outs_total", "counter",
                            "Sequences whose KV blocks were swapped to host "
                            "memory.", &model, st.swap_outs);
    p = ngx_http_moe_metric(p, last, "swap_slots_used", "gauge",
                            "Host swap slots holding KV blocks.", &model,
                            st.swap_slots_used);
    p = ngx_http_moe_metric(p, last, "backend_sampled_tokens_total",
                            "counter", "Tokens of non-greedy requests drawn "
                            "by the backend (on the GPU for cuda).", &model,
                            st.backend_sampled_tokens);
    p = ngx_http_moe_metric(p, last, "prefill_limited_steps_total",
                            "counter", "Steps whose prefill chunks "
                            "stall-free batching cut to keep decodes at "
                            "pace.", &model, st.prefill_limited_steps);
    p = ngx_http_moe_metric(p, last, "num_requests_running", "gauge",
                            "Sequences running.", &model, st.seqs_running);
    p = ngx_http_moe_metric(p, last, "num_requests_waiting", "gauge",
                            "Sequences waiting.", &model, st.seqs_waiting);
    p = ngx_http_moe_metric(p, last, "kv_cache_blocks_total", "gauge",
                            "KV cache blocks.", &model, st.kv_blocks_total);
    p = ngx_http_moe_metric(p, last, "kv_cache_blocks_used", "gauge",
                            "KV cache blocks in use.", &model,
                            st.kv_blocks_used);
    p = ngx_http_moe_metric(p, last, "kv_cache_blocks_cached", "gauge",
                            "Free KV cache blocks holding a cached prefix.",
                            &model, st.kv_blocks_cached);
    p = ngx_http_moe_metric(p, last, "weights_bytes", "gauge",
                            "Bytes of model weights.", &model,
                            st.weights_bytes);
    p = ngx_http_moe_metric(p, last, "submit_ring_free", "gauge",
                            "Free slots in the submit ring.", &model,
                            st.submit_ring_free);

    return ngx_http_moe_send_text(r, NGX_HTTP_OK,
                                  &ngx_http_moe_prometheus_type, start,
                                  p - start);
}


static u_char *
ngx_http_moe_metric(u_char *p, u_char *last, const char *name,
    const char *type, const char *help, ngx_str_t *model, int64_t value)
{
    return ngx_slprintf(p, last,
                        "# HELP localmoe_%s %s\n"
                        "# TYPE localmoe_%s %s\n"
                        "localmoe_%s{model=\"%V\"} %L\n",
                        name, help, name, type, name, model, value);
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

        t->add_generation_prompt = gen_prompt;
    }

    return ngx_http_moe_info_post(r, t, ngx_http_moe_tokenize_done);
}


static void
ngx_http_moe_tokenize_done(ngx_http_request_t *r, ngx_http_moe_text_t *t)
{
    size_t                     i, n;
    int32_t                   *ids;
    yajl_gen                   g;
    ngx_int_t                  rc;
    ngx_http_moe_err_t         err;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

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
    ngx_http_moe_gen_int(g, "max_model_len", mcf->info->max_model_len);
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
    size_t                     n;
    int32_t                   *ids;
    ngx_int_t                  rc;
    yajl_val                   v;
    ngx_http_moe_err_t         err;
    ngx_http_moe_text_t       *t;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

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

    rc = ngx_http_moe_json_ids(v, mcf->info->vocab_size, &ids, &n, r->pool);

    if (rc == NGX_DECLINED) {
        return ngx_http_moe_send_error(r, NGX_HTTP_BAD_REQUEST, "tokens",
                                       "tokens must be an array of token ids "
                                       "in [0, %d)", mcf->info->vocab_size);
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


/* the optional "model" of a POST body must name the served model */

ngx_int_t
ngx_http_moe_check_model(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_err_t *err)
{
    yajl_val   v;
    ngx_str_t  name;

    v = ngx_http_moe_json_get(root, "model");

    if (v == NULL) {
        return NGX_OK;
    }

    if (!YAJL_IS_STRING(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "model",
                                 "model must be a string");
    }

    name.data = (u_char *) v->u.string;
    name.len = ngx_strlen(v->u.string);

    return ngx_http_moe_check_name(r, &name, err);
}


static ngx_int_t
ngx_http_moe_check_name(ngx_http_request_t *r, ngx_str_t *name,
    ngx_http_moe_err_t *err)
{
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (name->len == ngx_strlen(mcf->info->served_name)
        && ngx_strncmp(name->data, mcf->info->served_name, name->len) == 0)
    {
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
