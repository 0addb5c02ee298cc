
/*
 * Copyright (C) LocalMoE contributors
 */


#ifndef _NGX_HTTP_MOE_MODULE_H_INCLUDED_
#define _NGX_HTTP_MOE_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include <moe.h>

#include <pthread.h>


#if !(NGX_THREADS)
#error ngx_http_moe_module needs nginx built with --with-threads
#endif


/* OpenAI accepts at most 4 stop strings; the engine could take more */
#define NGX_HTTP_MOE_MAX_STOP      ngx_min(4, MOE_MAX_STOP)

#define NGX_HTTP_MOE_DRAIN         256
#define NGX_HTTP_MOE_CANCEL_RETRY  10
#define NGX_HTTP_MOE_ERR_LEN       512
#define NGX_HTTP_MOE_MAX_DEPTH     64

/* API keys are kept as SHA-1 digests (ngx_http_moe_gate.c) */
#define NGX_HTTP_MOE_KEY_DIGEST    20

/* moe_metrics: who may read /metrics */
#define NGX_HTTP_MOE_METRICS_OPEN  0
#define NGX_HTTP_MOE_METRICS_KEY   1
#define NGX_HTTP_MOE_METRICS_ADMIN 2


/*
 * Admission control (ngx_http_moe_admit.c).  Only the worker's event loop
 * touches these, so plain counters are exact without locks or atomics: a
 * request is "waiting" from the moment it is admitted (before its body is
 * templated and tokenized on the thread pool) until the engine's first
 * event for it (its first token, or its end).
 */
typedef struct {
    ngx_uint_t                 waiting;          /* requests */
    uint64_t                   waiting_tokens;   /* their prompt tokens */
    ngx_uint_t                 max_waiting;      /* 429 past this */
    uint64_t                   max_tokens;       /* 0: no token budget */
    uint64_t                   rejected;         /* 429s sent */
} ngx_http_moe_admit_t;


typedef struct ngx_http_moe_inst_s  ngx_http_moe_inst_t;
typedef struct ngx_http_moe_eng_s   ngx_http_moe_eng_t;


typedef struct {
    ngx_str_t                  engine_file;
    moe_config_t              *config;

    /* worker state, set up by init_process */
    moe_event_t               *events;

    ngx_rbtree_t               requests;
    ngx_rbtree_node_t          sentinel;

    ngx_event_t                cancel_timer;

    uint64_t                   next_id;

    /* model instances (ngx_http_moe_inst.c): one per vllm_instances
     * entry, or the vllm: section's model alone */
    ngx_http_moe_inst_t       *inst;
    ngx_uint_t                 n_inst;
    ngx_str_t                  models_dir;  /* moe_models_dir: switch
                                               targets live under it */
    ngx_msec_t                 load_wait;   /* moe_load_wait: how long a
                                               load retries while memory
                                               is held by another worker */
    ngx_msec_t                 switch_wait; /* moe_switch_drain_wait */
    ngx_msec_t                 handover_wait; /* moe_handover_wait: how
                                               long a gracefully exiting
                                               worker waits for the next
                                               one to take its weights */
    ngx_event_handler_pt       wake_handler;    /* engine eventfd reads */
    ngx_log_t                 *log;

    ngx_str_t                  failed;      /* why the engine did not
                                               start; 503 with it */
    /* API keys (ngx_http_moe_gate.c), digests of NGX_HTTP_MOE_KEY_DIGEST */
    ngx_array_t               *keys;
    ngx_array_t               *admin_keys;
    ngx_flag_t                 auth;        /* some key source configured */
    ngx_flag_t                 admin_auth;
} ngx_http_moe_main_conf_t;


typedef struct {
    ngx_flag_t                 enable;
    size_t                     max_body_size;
    ngx_msec_t                 keepalive;
    ngx_str_t                  thread_pool_name;
    ngx_thread_pool_t         *thread_pool;
    ngx_uint_t                 metrics;     /* NGX_HTTP_MOE_METRICS_* */
} ngx_http_moe_loc_conf_t;


/* an OpenAI error body in the making */
typedef struct {
    ngx_uint_t                 status;
    const char                *type;
    const char                *param;       /* NULL: null */
    const char                *code;        /* NULL: null */
    u_char                     msg[NGX_HTTP_MOE_ERR_LEN];
    size_t                     len;
} ngx_http_moe_err_t;


/* a request's tools (ngx_http_moe_tools.c) */
typedef struct {
    yajl_val                   tools;       /* the request's tools array
                                               (or functions); NULL none */
    ngx_uint_t                 legacy;      /* given as functions */
    ngx_uint_t                 choice;      /* NGX_HTTP_MOE_TOOL_* */
    const char                *name;        /* CHOICE_NAMED: the function */
    ngx_uint_t                 format;      /* moe_tool_format_t of the
                                               output parser; 0: none */
    ngx_uint_t                 single;      /* parallel_tool_calls false */
    u_char                    *guide_spec;  /* a JSON Schema; NULL none */
    size_t                     guide_len;
} ngx_http_moe_tools_t;

#define NGX_HTTP_MOE_TOOL_NONE      0
#define NGX_HTTP_MOE_TOOL_AUTO      1
#define NGX_HTTP_MOE_TOOL_REQUIRED  2
#define NGX_HTTP_MOE_TOOL_NAMED     3


#define NGX_HTTP_MOE_TEXT_READ    1    /* read the spilled request body */
#define NGX_HTTP_MOE_TEXT_ENCODE  2    /* render messages (if any), encode */
#define NGX_HTTP_MOE_TEXT_DECODE  3    /* decode token ids */


/* a part of the request body that nginx wrote to its temporary file */
typedef struct {
    ngx_fd_t                   fd;
    off_t                      offset;
    size_t                     size;
    u_char                    *dst;
} ngx_http_moe_text_file_t;


typedef struct ngx_http_moe_text_s  ngx_http_moe_text_t;

typedef void (*ngx_http_moe_text_done_pt)(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);


/*
 * Text work for a thread of the pool.  The thread sees only this struct:
 * the inputs are set on the event loop before the task is posted and stay
 * untouched until it is done (they may point into r->pool, which lives
 * while r->main->blocked holds the request); the outputs are malloc()ed
 * by the thread and freed by a request pool cleanup.
 */

struct ngx_http_moe_text_s {
    /* inputs */
    ngx_uint_t                 op;          /* NGX_HTTP_MOE_TEXT_* */
    const moe_tokenizer_t     *tokenizer;
    const char                *chat_template;
    moe_chat_msg_t            *msgs;        /* ENCODE: NULL: encode text */
    ngx_int_t                  n_msgs;
    ngx_uint_t                 add_generation_prompt;
    ngx_uint_t                 add_special_tokens;
    const u_char              *text;        /* ENCODE without msgs */
    size_t                     len;
    /* tool calling (ngx_http_moe_tools.c): the prompt as JSON (the
     * schema of tool_choice required/named goes as guide_* below) */
    const char                *chat_json;   /* ENCODE: messages as JSON
                                               (used instead of msgs) */
    const char                *tools_json;  /* NULL: tools = none */

    const int32_t             *ids;         /* DECODE */
    size_t                     n_ids;
    ngx_http_moe_text_file_t  *files;       /* READ */
    ngx_uint_t                 n_files;
    ngx_uint_t                 skip_encode; /* ENCODE: ids given, the
                                               guide only */
    moe_guided_kind_t          guide_kind;  /* ENCODE: NONE or the guide
                                               to compile (cached) */
    const char                *guide_spec;
    size_t                     guide_len;

    /* outputs */
    int                        rc;          /* MOE_OK or a moe status */
    unsigned                   render_failed:1;
    ngx_err_t                  err;         /* READ: errno */
    char                      *out_text;    /* rendered or decoded */
    size_t                     out_len;
    int32_t                   *out_ids;
    size_t                     n_out;
    char                       msg[NGX_HTTP_MOE_ERR_LEN];
    moe_guide_t               *guide;       /* one reference, released by
                                               the pool cleanup */
    int                        guide_rc;
    char                       guide_msg[NGX_HTTP_MOE_ERR_LEN];

    /* the event loop's side */
    ngx_thread_task_t         *task;
    ngx_http_request_t        *request;
    ngx_http_moe_text_done_pt  done;
    void                      *data;
    unsigned                   running:1;
};


typedef struct {
    ngx_rbtree_node_t          node;        /* key: request id */

    uint64_t                   id;
    ngx_http_request_t        *request;
    ngx_http_moe_main_conf_t  *mcf;

    moe_textstream_t          *ts;
    yajl_gen                   gen;

    /* non-streamed output */
    u_char                    *text;
    size_t                     text_len;
    size_t                     text_cap;

    ngx_int_t                  n_prompt;
    ngx_int_t                  n_completion;
    ngx_int_t                  n_cached;
    const char                *finish_reason;

    ngx_str_t                  rid;         /* "cmpl-..." */
    ngx_str_t                  model;
    time_t                     created;

    ngx_chain_t               *free;
    ngx_chain_t               *busy;

    ngx_event_t                keepalive;
    ngx_msec_t                 keepalive_interval;

    ngx_http_moe_text_t       *task;        /* text work in flight */

    uint64_t                   waiting_tokens; /* counted in admit */

    ngx_http_moe_inst_t       *inst;        /* routed to (by "model") */
    ngx_http_moe_eng_t        *eng;         /* its engine, one reference
                                               held until the request
                                               ends (a switch leaves the
                                               stream on it) */
    ngx_chain_t               *gate_body;   /* JSON for the core's 413 */

    /* logprobs and echo (the logprobs block of ngx_http_moe_stream.c) */
    ngx_array_t               *lp;          /* ngx_http_moe_lp_tok_t: the
                                               tokens not yet sent */
    ngx_uint_t                 lp_top;      /* top entries per token */
    size_t                     lp_offset;   /* text_offset of the next */
    u_char                    *echo;        /* the prompt text to echo */
    size_t                     echo_len;
    unsigned                   logprobs:1;
    unsigned                   echo_on:1;
    unsigned                   echo_sent:1;

    /* n > 1 / best_of (the choices block of ngx_http_moe_stream.c): each
     * choice's text state lives in choices[] and is loaded into the
     * fields above while one of its events is handled */
    struct ngx_http_moe_choice_s  *choices; /* (n_choices) or NULL */
    ngx_uint_t                 n_choices;   /* the engine's (best_of) */
    ngx_uint_t                 n_return;    /* n: in the answer */
    ngx_uint_t                 n_ended;     /* engine FINISH events */
    ngx_uint_t                 n_done;      /* choices complete */
    ngx_uint_t                 cur;         /* the choice loaded */
    /* tool calls in the output (ngx_http_moe_stream.c, tool block) */
    moe_toolparse_t           *tp;          /* NULL: no tool parsing */
    unsigned                   tool_legacy:1; /* functions: function_call */

    unsigned                   chat:1;
    unsigned                   stream:1;
    unsigned                   include_usage:1;
    unsigned                   continuous_usage:1;  /* usage per chunk */
    unsigned                   live:1;      /* engine sequence not ended */
    unsigned                   in_map:1;
    unsigned                   got_token:1;
    unsigned                   done:1;
    unsigned                   waiting:1;   /* counted in admit */
    unsigned                   gate_sent:1;
} ngx_http_moe_ctx_t;


/* one choice of a request with n > 1 (ngx_http_moe_stream.c) */
typedef struct ngx_http_moe_choice_s {
    moe_textstream_t          *ts;
    u_char                    *text;
    size_t                     text_len;
    size_t                     text_cap;
    ngx_array_t               *lp;
    size_t                     lp_offset;
    const char                *finish_reason;
    ngx_int_t                  n_seen;      /* TOKEN events */
    double                     cum_logprob; /* best_of ranks by it */
    unsigned                   done:1;
    unsigned                   echo_sent:1;
} ngx_http_moe_choice_t;


/* one token's logprobs, its text decoded alone (the module's pool) */
typedef struct {
    ngx_str_t                  text;
    float                      logprob;
} ngx_http_moe_lp_top_t;

typedef struct {
    ngx_str_t                  text;
    float                      logprob;
    ngx_uint_t                 no_logprob;  /* the first prompt token */
    size_t                     offset;      /* completions text_offset */
    ngx_uint_t                 n_top;
    ngx_http_moe_lp_top_t     *top;
} ngx_http_moe_lp_tok_t;


/*
 * Model instances (ngx_http_moe_inst.c).  An engine is created on a
 * thread of its own (never on the event loop) and polled for by a timer;
 * requests hold a reference to the engine they run on, so a switched-out
 * engine keeps serving its streams and is destroyed (on a thread, weights
 * freed) after the last one.
 */

#define NGX_HTTP_MOE_INST_LOADING  0
#define NGX_HTTP_MOE_INST_OK       1
#define NGX_HTTP_MOE_INST_FAILED   2

typedef struct ngx_http_moe_load_s  ngx_http_moe_load_t;

struct ngx_http_moe_eng_s {
    moe_engine_t              *engine;
    const moe_model_info_t    *info;
    const moe_tokenizer_t     *tokenizer;
    ngx_http_moe_inst_t       *inst;
    ngx_connection_t          *wake;
    ngx_array_t               *cancels;     /* of uint64_t */
    ngx_uint_t                 refs;        /* requests, +1 while current */
    ngx_event_t                reap;        /* destroys when unreferenced */
    ngx_http_moe_eng_t        *next;        /* inst->retired */
    pthread_t                  thread;      /* moe_engine_destroy() */
    int                        destroyed;   /* atomic: the thread is done */
    int64_t                    weights_bytes;
    unsigned                   retired:1;
    unsigned                   destroying:1;
};

struct ngx_http_moe_inst_s {
    ngx_http_moe_main_conf_t  *mcf;
    ngx_uint_t                 index;
    u_char                     name_buf[MOE_NAME_MAX];
    ngx_str_t                  name;        /* served model name */
    moe_config_t              *config;      /* this instance's (malloc) */
    ngx_uint_t                 state;       /* NGX_HTTP_MOE_INST_* */
    u_char                     failed_buf[NGX_HTTP_MOE_ERR_LEN];
    ngx_str_t                  failed;
    ngx_http_moe_eng_t        *eng;         /* current; NULL: none */
    ngx_http_moe_eng_t        *retired;     /* old engines finishing */
    ngx_http_moe_admit_t       admit;

    /* loading (at start and for a switch) */
    ngx_http_moe_load_t       *load;
    ngx_event_t                load_timer;
    ngx_msec_t                 load_start;
    ngx_msec_t                 last_load_ms;
    ngx_uint_t                 attempts;

    /* a switch in progress */
    ngx_http_request_t        *switch_req;
    moe_config_t              *switch_cfg;  /* the new model's (malloc) */
    ngx_uint_t                 drained;     /* old engine drained first */
    ngx_msec_t                 drain_start;

    int64_t                    loads;       /* engines created */
    int64_t                    switches;    /* switches done */
    int64_t                    switch_failures;
    int64_t                    engines_freed;  /* old engines destroyed */
    int64_t                    weights_freed;  /* their weights, bytes */
};


/*
 * The files call each other without loops; each uses only those listed
 * above it:
 *
 *   json      OpenAI JSON in and out, error bodies, sending a response
 *   admit     admission control: 429 past the waiting limits
 *   request   the request context, requests by id, cancels, the index,
 *             engine references
 *   inst      model instances: engines loaded on threads, routing by
 *             "model", /v1/models/switch, engines retired after their
 *             last request
 *   tools     tools, tool_choice, functions: checked; the prompt as JSON
 *   text      text work on the thread pool (body file, template, tokenizer)
 *   stream    engine events to SSE chunks or the final JSON
 *   info      GET routes, /tokenize, /detokenize
 *   gate      API keys, the JSON 413 of the body size limit
 *   handler   routing, request bodies, completions and chat
 *   module    directives, worker start and stop, the engine's eventfd
 *
 * ngx_http_moe_router.c is a module of its own in the same .so
 * (ngx_http_moe_router_module: $moe_prefix_key for a front nginx with no
 * engine); it uses none of the files above, and they do not use it.
 */

/* ngx_http_moe_json.c */
yajl_gen ngx_http_moe_gen_create(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_send_gen(ngx_http_request_t *r, ngx_uint_t status,
    yajl_gen g);
ngx_int_t ngx_http_moe_send_text(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *data, size_t len);
ngx_int_t ngx_http_moe_fail(ngx_http_moe_err_t *err, ngx_uint_t status,
    const char *param, const char *fmt, ...);
ngx_int_t ngx_http_moe_send_err(ngx_http_request_t *r,
    ngx_http_moe_err_t *err);
ngx_int_t ngx_http_moe_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *param, const char *fmt, ...);
void ngx_http_moe_gen_error(yajl_gen g, ngx_http_moe_err_t *err);
ngx_int_t ngx_http_moe_json_parse(ngx_http_request_t *r, u_char *data,
    size_t len, yajl_val *root, ngx_http_moe_err_t *err);
yajl_val ngx_http_moe_json_parse_text(const char *text);
yajl_val ngx_http_moe_json_get(yajl_val obj, const char *key);
yajl_val ngx_http_moe_json_find(yajl_val obj, const char *key);
ngx_int_t ngx_http_moe_json_int(yajl_val v, int64_t *out);
ngx_int_t ngx_http_moe_json_number(yajl_val v, double *out);
ngx_int_t ngx_http_moe_json_bool(yajl_val v, ngx_uint_t *out);
ngx_int_t ngx_http_moe_json_ids(yajl_val v, int vocab, int32_t **ids,
    size_t *n, ngx_pool_t *pool);
ngx_int_t ngx_http_moe_messages(ngx_http_request_t *r, yajl_val v,
    moe_chat_msg_t **msgs, ngx_int_t *n, ngx_http_moe_err_t *err);

/*
 * The module's configuration and request context by the module's index,
 * for the files below ngx_http_moe_module.c: naming the module struct
 * itself would make each of them depend on the file that defines it,
 * which calls into them.  ngx_http_moe_module.c sets the index when it
 * creates the main configuration.
 */

extern ngx_uint_t  ngx_http_moe_ctx_index;

#define ngx_http_moe_main_conf(r)                                             \
    ((ngx_http_moe_main_conf_t *) (r)->main_conf[ngx_http_moe_ctx_index])
#define ngx_http_moe_loc_conf(r)                                              \
    ((ngx_http_moe_loc_conf_t *) (r)->loc_conf[ngx_http_moe_ctx_index])
#define ngx_http_moe_get_ctx(r)                                               \
    ((ngx_http_moe_ctx_t *) (r)->ctx[ngx_http_moe_ctx_index])
/* the model the request was routed to (ngx_http_moe_check_model) */
#define ngx_http_moe_model_info(r)                                            \
    ((const moe_model_info_t *) ngx_http_moe_get_ctx(r)->eng->info)
#define ngx_http_moe_set_ctx(r, c)                                            \
    (r)->ctx[ngx_http_moe_ctx_index] = (c)


/* ngx_http_moe_admit.c */
void ngx_http_moe_admit_init(ngx_http_moe_admit_t *a,
    const moe_config_t *config);
ngx_int_t ngx_http_moe_admit(ngx_http_request_t *r, ngx_http_moe_ctx_t *ctx,
    ngx_http_moe_err_t *err);
ngx_int_t ngx_http_moe_admit_tokens(ngx_http_request_t *r,
    ngx_http_moe_ctx_t *ctx, size_t n, ngx_http_moe_err_t *err);
void ngx_http_moe_admit_done(ngx_http_moe_ctx_t *ctx);

time_t ngx_http_moe_retry_after(ngx_http_moe_inst_t *inst);
ngx_int_t ngx_http_moe_set_retry_after(ngx_http_request_t *r, time_t sec);

/* ngx_http_moe_request.c */
ngx_http_moe_ctx_t *ngx_http_moe_ctx_create(ngx_http_request_t *r);
ngx_http_moe_ctx_t *ngx_http_moe_lookup(ngx_http_moe_main_conf_t *mcf,
    uint64_t id);
void ngx_http_moe_register(ngx_http_moe_ctx_t *ctx);
void ngx_http_moe_unregister(ngx_http_moe_ctx_t *ctx);
void ngx_http_moe_cancel(ngx_http_moe_eng_t *eng, uint64_t id);
void ngx_http_moe_retry_cancels(ngx_http_moe_eng_t *eng);
void ngx_http_moe_cancel_handler(ngx_event_t *ev);
void ngx_http_moe_eng_unref(ngx_http_moe_eng_t *eng);

/* ngx_http_moe_inst.c */
ngx_int_t ngx_http_moe_inst_init(ngx_cycle_t *cycle,
    ngx_http_moe_main_conf_t *mcf);
void ngx_http_moe_inst_exit(ngx_http_moe_main_conf_t *mcf);
ngx_http_moe_inst_t *ngx_http_moe_inst_find(ngx_http_moe_main_conf_t *mcf,
    u_char *name, size_t len);
ngx_int_t ngx_http_moe_inst_route(ngx_http_request_t *r,
    ngx_http_moe_ctx_t *ctx, ngx_http_moe_inst_t *inst,
    ngx_http_moe_err_t *err);
ngx_http_moe_eng_t *ngx_http_moe_inst_any(ngx_http_moe_main_conf_t *mcf);
ngx_int_t ngx_http_moe_inst_unavailable(ngx_http_request_t *r,
    ngx_http_moe_main_conf_t *mcf);
ngx_int_t ngx_http_moe_inst_switch(ngx_http_request_t *r, yajl_val root);
const char *ngx_http_moe_inst_state(ngx_http_moe_inst_t *inst);

/* ngx_http_moe_tools.c */
ngx_int_t ngx_http_moe_tools_parse(ngx_http_request_t *r, yajl_val root,
    ngx_uint_t chat, ngx_http_moe_tools_t *tl, ngx_http_moe_err_t *err);
ngx_int_t ngx_http_moe_tools_prompt(ngx_http_request_t *r, yajl_val messages,
    moe_chat_msg_t *msgs, ngx_http_moe_tools_t *tl, ngx_http_moe_text_t *t,
    ngx_http_moe_err_t *err);

/* ngx_http_moe_text.c */
ngx_http_moe_text_t *ngx_http_moe_text_create(ngx_http_request_t *r,
    ngx_uint_t op);
ngx_int_t ngx_http_moe_text_post(ngx_http_request_t *r,
    ngx_http_moe_text_t *t, ngx_http_moe_text_done_pt done, void *data,
    ngx_http_moe_err_t *err);
ngx_int_t ngx_http_moe_text_ids(ngx_http_request_t *r,
    ngx_http_moe_text_t *t, int32_t **ids, size_t *n,
    ngx_http_moe_err_t *err);
void ngx_http_moe_text_free(ngx_http_moe_text_t *t);

/* ngx_http_moe_stream.c */
ngx_int_t ngx_http_moe_choices_init(ngx_http_moe_ctx_t *ctx,
    ngx_uint_t n_choices, ngx_uint_t n_return, const char *const *stops,
    int n_stops, int skip_special_tokens);
ngx_int_t ngx_http_moe_stream_start(ngx_http_moe_ctx_t *ctx);
void ngx_http_moe_stream_event(ngx_http_moe_ctx_t *ctx, moe_event_t *ev);
ngx_int_t ngx_http_moe_stream_tools(ngx_http_moe_ctx_t *ctx,
    ngx_http_moe_tools_t *tl);

/* ngx_http_moe_info.c: GET routes and the tokenizer routes */
ngx_int_t ngx_http_moe_health(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_models(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_model(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_stats_memory(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_stats_performance(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_metrics(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_tokenize(ngx_http_request_t *r, yajl_val root);
ngx_int_t ngx_http_moe_detokenize(ngx_http_request_t *r, yajl_val root);
ngx_int_t ngx_http_moe_check_model(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_err_t *err);

/* ngx_http_moe_gate.c */
ngx_int_t ngx_http_moe_gate_load(ngx_conf_t *cf,
    ngx_http_moe_main_conf_t *mcf);
ngx_int_t ngx_http_moe_gate_auth(ngx_http_request_t *r);
ngx_int_t ngx_http_moe_gate_init(ngx_conf_t *cf);

/* ngx_http_moe_handler.c */
ngx_int_t ngx_http_moe_handler(ngx_http_request_t *r);


#define ngx_http_moe_gen_lit(g, s)                                            \
    yajl_gen_string(g, (const unsigned char *) s, sizeof(s) - 1)

#define ngx_http_moe_gen_cstr(g, s)                                           \
    yajl_gen_string(g, (const unsigned char *) (s), ngx_strlen(s))

#define ngx_http_moe_gen_str(g, p, n)                                         \
    yajl_gen_string(g, (const unsigned char *) (p), n)


extern ngx_module_t  ngx_http_moe_module;


#endif /* _NGX_HTTP_MOE_MODULE_H_INCLUDED_ */
