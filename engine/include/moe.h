/*
 * LocalMoE engine (libmoe): the one public header.
 *
 * The nginx module and the `moe` CLI use only what is declared here.  The
 * engine is plain C11 and never includes ngx_*.h.  Every function that can
 * fail returns a moe status (MOE_OK == 0, negative on failure) and, where it
 * takes an `err` buffer, writes a one-line human readable reason there.
 * Nothing here exits or aborts the process.
 *
 * Threading: a moe_engine_t owns one engine thread.  moe_engine_submit(),
 * moe_engine_cancel(), moe_engine_drain() and moe_engine_stats() are called
 * from ONE producer/consumer thread (the nginx worker); they are lock-free
 * (single-producer/single-consumer rings).  The tokenizer and model info are
 * immutable after create and may be read from any thread.
 */

#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- status */

enum {
    MOE_OK           =  0,
    MOE_EINVAL       = -1,   /* bad argument or bad input */
    MOE_ENOMEM       = -2,   /* allocation failed */
    MOE_EFULL        = -3,   /* ring full: try again later (HTTP 503) */
    MOE_EIO          = -4,   /* file missing or unreadable */
    MOE_EFORMAT      = -5,   /* malformed file */
    MOE_EUNSUPPORTED = -6,   /* valid but not supported (arch, dtype, ...) */
    MOE_ETOOLONG     = -7,   /* prompt + max_tokens over max_model_len */
    MOE_ESTATE       = -8,   /* call not valid in this state */
    MOE_EBACKEND     = -9    /* backend (CPU/CUDA) failure */
};

/* Static string naming a status ("invalid argument", ...). Never NULL. */
const char *moe_strerror(int status);

/*
 * Log sink for engine messages (model load progress, config overrides,
 * warnings).  Called from the creating thread and from the engine thread;
 * fn must be thread-safe.  Default (fn == NULL): lines on stderr.
 * Levels: MOE_LOG_ERROR .. MOE_LOG_DEBUG.
 */
enum { MOE_LOG_ERROR = 0, MOE_LOG_WARN = 1, MOE_LOG_INFO = 2,
       MOE_LOG_DEBUG = 3 };
typedef void (*moe_log_fn)(void *ctx, int level, const char *msg);
void moe_set_log(moe_log_fn fn, void *ctx);
void moe_log(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* printf into an err buffer of errlen bytes; NULL or 0 is a no-op. */
void moe_errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * The whole file in a malloc'ed buffer with a '\0' appended (*len, when len
 * is not NULL: the bytes before it).  NULL with errno set on failure (EIO
 * for a short read).
 */
char *moe_read_file(const char *path, size_t *len);


/* ---------------------------------------------------------- configuration */

#define MOE_PATH_MAX       1024
#define MOE_NAME_MAX       256
#define MOE_MAX_INSTANCES  8
#define MOE_MAX_GPUS       16
#define MOE_MAX_API_KEYS   16
#define MOE_API_KEY_MAX    256

typedef struct {
    char  model_name[MOE_PATH_MAX];   /* as written in the YAML */
    char  model_path[MOE_PATH_MAX];   /* resolved model directory */
    int   tensor_parallel_size;       /* >= 1 */
    int   gpu_devices[MOE_MAX_GPUS];
    int   n_gpu_devices;              /* 0: devices 0..tp-1 */
    int   line;                       /* YAML line of the entry, for errors */
} moe_instance_conf_t;

/*
 * The parsed YAML (see conf/localmoe.yaml).  -1 in an int field of the
 * `model:` section means "not given" (the model's config.json decides).
 */
typedef struct moe_config {
    char    file[MOE_PATH_MAX];       /* the YAML file it came from */

    /* model: section (the seed's) */
    int     num_experts;              /* -1 unset; model wins if it differs */
    int     top_k_experts;            /* -1 unset; overrides the model's */
    int     hidden_size;              /* -1 unset */
    int     intermediate_size;        /* -1 unset */
    int     max_sequence_length;      /* -1 unset */
    char    quantization_type[16];    /* "fp32" "fp16" "bf16"; "" unset */
    int     enable_compilation;       /* 1 default */

    /* vllm: section */
    char    model_name[MOE_PATH_MAX]; /* as written */
    char    model_path[MOE_PATH_MAX]; /* resolved model directory */
    char    served_model_name[MOE_NAME_MAX]; /* /v1/models id; default
                                                model_name */
    int     tensor_parallel_size;     /* 1 default */
    double  gpu_memory_utilization;   /* 0.9 default, (0, 1] */
    int     max_model_len;            /* 0: from the model (capped 2048
                                         on CPU) */
    int     block_size;               /* 16 default; 1..256 */
    double  swap_space;               /* GiB, 4 default, >= 0 */
    int     max_num_batched_tokens;   /* 8192 default */
    int     max_num_seqs;             /* 256 default */
    int     enable_prefix_caching;    /* 0/1, default 1 */
    int     enable_chunked_prefill;   /* 0/1, default 1 */
    int     use_v2_block_manager;     /* accepted, no effect */
    int     max_chunked_prefill_tokens; /* 0: max_num_batched_tokens */
    double  prefill_step_ratio;       /* stall-free batching: a step with
                                         decodes may take at most this
                                         times the decodes' own measured
                                         cost; 0: off; default 5 */
    char    quantization[32];         /* "" (null) */
    int     trust_remote_code;        /* accepted; never runs remote code */
    char    load_format[32];          /* "auto" | "safetensors" */
    char    chat_template[8192];      /* vllm.chat_template as written: an
                                         inline Jinja template or a file
                                         name; "" unset (the model's) */
    char    chat_template_file[MOE_PATH_MAX]; /* the file, resolved against
                                         the YAML's directory; "" when
                                         chat_template is inline/unset */
    int     model_line;               /* YAML line of model_name, for
                                         errors; 0 unknown */
    /* the KV cache element (vllm.kv_cache_dtype): "auto" (the model's
     * dtype, default) | "fp8" | "fp8_e4m3" (e4m3 with per-tensor scales
     * kv_cache_scale_k / _v: value = e4m3(x / scale) * scale; 0 when
     * unset: each layer's from the checkpoint's k_scale / v_scale
     * tensors, else 1.0) */
    char    kv_cache_dtype[16];
    double  kv_cache_scale_k, kv_cache_scale_v;

    /* vllm: tool calling (vLLM's --tool-call-parser and
     * --enable-auto-tool-choice) */
    char    tool_call_parser[16];     /* "auto" (default: from the model's
                                         template/architecture), "hermes",
                                         "mistral", "llama3_json", "none" */
    int     enable_auto_tool_choice;  /* 0/1, default 1: tool_choice "auto"
                                         parses calls; 0: refused (400) */

    /* LocalMoE extensions (engine: section or top level keys) */
    char    backend[16];              /* "auto" | "cpu" | "cuda" */
    int     cpu_threads;              /* 0: all cores */
    int     cpu_tensor_parallel;      /* 1: the CPU backend also splits the
                                         model over tensor_parallel_size
                                         ranks (threads; the reference of
                                         the sharding, slower than one
                                         rank); 0: one rank (default) */

    /* scale-out over ranks (issue 11): expert parallelism and NCCL */
    int     expert_parallel;          /* vllm.expert_parallel: 1: routed
                                         experts placed whole on the
                                         tensor_parallel_size ranks (E / tp
                                         each), attention still split;
                                         0 (default): experts split too */
    char    nccl[8];                  /* engine.nccl: "auto" (default:
                                         NCCL between ranks on distinct
                                         GPUs when the build has it),
                                         "on" (required; with one rank
                                         too: an identity all-reduce),
                                         "off" (peer-access sums) */
    int     kv_cache_blocks;          /* 0: size from memory settings */
    int     ring_size;                /* submit/completion ring slots,
                                         default 4096, power of two */
    int     max_waiting_requests;     /* admission: requests admitted but
                                         not yet running (tokenizing,
                                         queued, prefilling) above which
                                         the server answers 429; default
                                         4 * max_num_seqs */
    int     max_waiting_tokens;       /* admission: prompt tokens of those
                                         requests; 0: no token budget
                                         (default) */

    moe_instance_conf_t instances[MOE_MAX_INSTANCES];
    int     n_instances;              /* vllm_instances: entries */

    /* server: section (the HTTP front; the engine itself ignores it).
     * Keys are secrets: nothing here is ever quoted in an error. */
    char    api_keys[MOE_MAX_API_KEYS][MOE_API_KEY_MAX]; /* api_key */
    int     n_api_keys;
    char    api_key_file[MOE_PATH_MAX];       /* "" none; resolved
                                                 against the YAML's dir */
    char    admin_api_keys[MOE_MAX_API_KEYS][MOE_API_KEY_MAX];
    int     n_admin_api_keys;                 /* admin_api_key */
    char    admin_api_key_file[MOE_PATH_MAX];
} moe_config_t;

/* Fill *c with the defaults above. */
void moe_config_defaults(moe_config_t *c);

/*
 * Parse the YAML file `path` into *c (defaults first).  Unknown keys, wrong
 * types and out-of-range values fail with MOE_EINVAL and err set to
 * "<file>:<line>: <reason>".  A model_name that is a relative path is
 * resolved against the YAML file's directory, then its parent, then the
 * current directory; "org/name" ids are also looked up as models/org/name
 * there.  A model directory that cannot be found fails with its line.
 */
int moe_config_load(const char *path, moe_config_t *c, char *err,
    size_t errlen);

/*
 * What can be checked of the configured models without loading them, for
 * the nginx master before it forks (nginx -t): each model directory is
 * readable, config.json parses and names a supported architecture, the
 * safetensors headers parse and hold every tensor the model needs with its
 * shape and within its file (the weights are mapped, never read),
 * tokenizer.json is readable (it is parsed by the worker only).  MOE_OK, or a
 * status with err "<yaml>:<line>: model '<name>': <reason>".
 */
int moe_model_check(const moe_config_t *c, char *err, size_t errlen);


/* -------------------------------------------------------------- tokenizer */

typedef struct moe_tokenizer moe_tokenizer_t;

/*
 * Load a Hugging Face tokenizer.json (and, if present beside it,
 * tokenizer_config.json for bos/eos/chat_template).  Supports byte-level BPE
 * (GPT-2 / Llama-3 / Qwen) and SentencePiece-style BPE with byte fallback
 * (Llama-2 / Mistral / Mixtral), added and special tokens.  The result is
 * immutable and thread-safe to read.  Caller frees with
 * moe_tokenizer_free().
 */
int moe_tokenizer_load(const char *tokenizer_json_path,
    moe_tokenizer_t **out, char *err, size_t errlen);
void moe_tokenizer_free(moe_tokenizer_t *t);

/*
 * Encode UTF-8 text exactly as HF tokenizers' encode(text,
 * add_special_tokens) does.  *ids is malloc()ed (caller frees) and holds *n
 * ids.  Invalid UTF-8 is replaced by U+FFFD first (as Python's
 * errors="replace" would), never rejected.
 */
int moe_tokenizer_encode(const moe_tokenizer_t *t, const char *text,
    size_t len, int add_special_tokens, int32_t **ids, size_t *n);

/*
 * Decode ids to UTF-8 as HF's decode(ids, skip_special_tokens).  *text is
 * malloc()ed, NUL terminated, *len bytes.  Ids out of range: MOE_EINVAL.
 */
int moe_tokenizer_decode(const moe_tokenizer_t *t, const int32_t *ids,
    size_t n, int skip_special_tokens, char **text, size_t *len);

int         moe_tokenizer_vocab_size(const moe_tokenizer_t *t);
/* id of an exact token string (added or vocab), -1 if none */
int32_t     moe_tokenizer_token_to_id(const moe_tokenizer_t *t,
    const char *token);
/* token string of an id (vocab form, e.g. "Ġthe"), NULL if out of range */
const char *moe_tokenizer_id_to_token(const moe_tokenizer_t *t, int32_t id);
/* 1 if id is a special added token */
int         moe_tokenizer_is_special(const moe_tokenizer_t *t, int32_t id);

/*
 * Incremental detokenizer for streaming.  Push generated ids one at a time;
 * each push appends to *out only text that is final: never half a UTF-8
 * character, and the concatenation of every piece plus the flush equals
 * moe_tokenizer_decode(all ids, skip_special_tokens).  `out` is a
 * malloc()ed buffer owned by the caller, grown with realloc.
 */
typedef struct moe_detok moe_detok_t;

moe_detok_t *moe_detok_create(const moe_tokenizer_t *t,
    int skip_special_tokens);
void moe_detok_free(moe_detok_t *d);
/* Appends final text to (*out, *len, *cap).  MOE_ENOMEM on failure. */
int moe_detok_push(moe_detok_t *d, int32_t id, char **out, size_t *len,
    size_t *cap);
/* Appends whatever is still held back (replacement chars for a truncated
 * UTF-8 tail, as HF decode would). */
int moe_detok_flush(moe_detok_t *d, char **out, size_t *len, size_t *cap);


/* ---------------------------------------------------------- text streams */

#define MOE_MAX_STOP 8

/*
 * Detokenizer plus stop strings: push ids, get back text that is safe to
 * send.  Text that might be the start of a stop string is held back until
 * it is known not to be; when a stop string is completed (even across token
 * boundaries) `stopped` becomes 1 and the text before the stop string is
 * the last emitted.  The stop string itself is never emitted.
 */
typedef struct moe_textstream moe_textstream_t;

moe_textstream_t *moe_textstream_create(const moe_tokenizer_t *t,
    const char *const *stops, int n_stops, int skip_special_tokens);
void moe_textstream_free(moe_textstream_t *s);
/*
 * Push one id.  On return (*text, *len) points at new text to send (owned
 * by the stream, valid until the next call), possibly empty.  *stopped is
 * set to 1 once a stop string matched; further pushes return nothing.
 */
int moe_textstream_push(moe_textstream_t *s, int32_t id, const char **text,
    size_t *len, int *stopped);
/* End of generation: returns the held back text (no stop matched). */
int moe_textstream_finish(moe_textstream_t *s, const char **text,
    size_t *len);


/* ----------------------------------------------------------- chat prompts */

typedef struct {
    const char *role;        /* "system" "user" "assistant" "tool" ... */
    const char *content;     /* UTF-8, may be "" */
    size_t      content_len;
} moe_chat_msg_t;

/*
 * Render a conversation into the prompt text the model expects.  Uses the
 * model's chat template when the engine supports it, else ChatML
 * (<|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n).
 * *out is malloc()ed.  Fails with MOE_EINVAL and err set when the template
 * cannot be rendered (names the construct).
 */
int moe_chat_render(const moe_tokenizer_t *t, const char *chat_template,
    const moe_chat_msg_t *msgs, int n_msgs, int add_generation_prompt,
    char **out, size_t *out_len, char *err, size_t errlen);


/* ------------------------------------------------- tool calls (chat tools) */

/*
 * Prompts with tools: the conversation and the tools as JSON texts, so a
 * template sees messages with their structure (role "tool" with
 * tool_call_id and name, assistant turns with tool_calls whose
 * function.arguments may be objects) and `tools` as transformers passes
 * them.  messages_json: a JSON array of message objects (NUL terminated);
 * tools_json: a JSON array or NULL (the template sees tools = none).
 * chat_template NULL: ChatML as moe_chat_render().  *out is malloc()ed;
 * MOE_EINVAL with err set for malformed JSON or a template that fails.
 */
int moe_chat_render_json(const moe_tokenizer_t *t, const char *chat_template,
    const char *messages_json, const char *tools_json,
    int add_generation_prompt, char **out, size_t *out_len, char *err,
    size_t errlen);

/*
 * How a model writes tool calls in its output (vLLM's tool_call_parser
 * names), and the two shapes the guided decoder forces for tool_choice
 * "required" (a JSON array of {"name", "parameters"}) and a named function
 * (the whole output is that function's arguments).
 */
typedef enum {
    MOE_TOOL_NONE        = 0,   /* no parsing: all output is content */
    MOE_TOOL_HERMES      = 1,   /* <tool_call>{"name","arguments"}</tool_call> */
    MOE_TOOL_MISTRAL     = 2,   /* [TOOL_CALLS][{"name","arguments"}, ...] */
    MOE_TOOL_LLAMA3_JSON = 3,   /* {"name","parameters"} (after
                                   <|python_tag|> or as the whole output),
                                   several separated by ';' */
    MOE_TOOL_REQUIRED    = 4,   /* [{"name","parameters"}, ...] */
    MOE_TOOL_NAMED       = 5    /* the arguments of one named function */
} moe_tool_format_t;

/* "hermes" "mistral" "llama3_json" "none" -> the format; -1 unknown. */
int moe_tool_format_from_name(const char *name);

/* The vLLM name of a format ("hermes", ..., "required", "named"). */
const char *moe_tool_format_name(int format);

/*
 * The parser for a model family: from the markers its chat template writes
 * (<tool_call>, [TOOL_CALLS], <|python_tag|>/ipython), else from the
 * architecture (Qwen -> hermes, Mistral/Mixtral -> mistral, Llama ->
 * llama3_json), else hermes.  Either argument may be NULL.
 */
moe_tool_format_t moe_tool_format_detect(const char *architecture,
    const char *chat_template);

/*
 * A tool-call parser over streamed output text.  Push text as it is
 * decoded; then take events in order with moe_toolparse_next(): content
 * that is safe to show (text that may be the start of a tool call is held
 * back until it is known not to be one), the start of a call (index, id
 * "call_" + random, or 9 random characters for mistral as its template
 * wants; function name; arguments "") and fragments of its arguments (a
 * JSON text).  A call whose JSON is malformed, or nested deeper than 128
 * arrays and objects, is given back as content.
 * NAMED: the call starts at once and every pushed byte is arguments.
 * Owned by one thread at a time.
 */
typedef struct moe_toolparse moe_toolparse_t;

typedef enum {
    MOE_TOOLEV_CONTENT   = 1,   /* text: content */
    MOE_TOOLEV_CALL      = 2,   /* a call starts: index, id, name */
    MOE_TOOLEV_ARGUMENTS = 3    /* text: a fragment of call index's
                                   arguments */
} moe_toolev_type_t;

typedef struct {
    int          type;          /* moe_toolev_type_t */
    int          index;         /* CALL, ARGUMENTS: the call, from 0 */
    const char  *id;            /* CALL */
    const char  *name;          /* CALL */
    const char  *text;          /* CONTENT, ARGUMENTS (not NUL terminated) */
    size_t       len;
} moe_toolev_t;

/*
 * A parser for `format`; fn_name: the function of a NAMED format (copied),
 * else ignored; seed: for the call ids.  NULL when out of memory or
 * NAMED without a name.
 */
moe_toolparse_t *moe_toolparse_create(moe_tool_format_t format,
    const char *fn_name, uint64_t seed);
void moe_toolparse_free(moe_toolparse_t *p);

/* Push output text.  Events of an earlier push not yet taken stay queued.
 * MOE_ENOMEM on failure (the parser is then unusable). */
int moe_toolparse_push(moe_toolparse_t *p, const char *text, size_t len);

/* End of output: what was held back is resolved (a last call without its
 * closing tag is still a call when its JSON parses, as vLLM does). */
int moe_toolparse_finish(moe_toolparse_t *p);

/* The next event of the last push or finish: 1 and *ev (its strings live
 * until the next push/finish/free), or 0 when there is none. */
int moe_toolparse_next(moe_toolparse_t *p, moe_toolev_t *ev);

/* Calls parsed so far, and call i whole (arguments: a JSON text). */
int moe_toolparse_n_calls(const moe_toolparse_t *p);
int moe_toolparse_call(const moe_toolparse_t *p, int i, const char **id,
    const char **name, const char **args, size_t *args_len);


/* ------------------------------------------------------- guided decoding */

/*
 * A guide constrains generation to a language: the allowed-token mask over
 * the vocabulary is computed per sequence per step from a compiled guide
 * and applied before sampling (both backends); EOS is allowed only where
 * the language may end.  Compiling is slow work (module: on the text
 * thread pool); a compiled guide is immutable, reference counted and may be
 * shared by any number of sequences and threads.
 */
typedef enum {
    MOE_GUIDED_NONE        = 0,
    MOE_GUIDED_JSON        = 1,   /* spec: a JSON Schema (JSON text) */
    MOE_GUIDED_JSON_OBJECT = 2,   /* any JSON object; spec ignored */
    MOE_GUIDED_REGEX       = 3,   /* spec: a regular expression */
    MOE_GUIDED_GRAMMAR     = 4,   /* spec: a GBNF grammar (root rule) */
    MOE_GUIDED_CHOICE      = 5    /* spec: JSON array of strings */
} moe_guided_kind_t;

typedef struct moe_guide moe_guide_t;

/*
 * Compile spec (len bytes, not NUL-terminated necessarily) of the given kind
 * against tokenizer t.  MOE_OK with *out holding one reference; MOE_EINVAL
 * with err naming the problem (unsupported keyword, syntax error at offset,
 * a language with no string, a schema too large, a guide too complex to
 * match) otherwise.
 */
int moe_guide_compile(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *spec, size_t len, moe_guide_t **out, char *err,
    size_t errlen);

/* Take / drop one reference (thread-safe).  NULL is a no-op. */
moe_guide_t *moe_guide_ref(moe_guide_t *g);
void moe_guide_release(moe_guide_t *g);

/* 1 when g was compiled against tokenizer t (as loaded now): a cached
 * guide may serve t's requests; 0 otherwise (another model's, or a
 * reloaded one).  A guide stays valid after its tokenizer is freed. */
int moe_guide_matches(const moe_guide_t *g, const moe_tokenizer_t *t);


/* --------------------------------------------------------------- sampling */

#define MOE_MAX_STOP_IDS 16
#define MOE_MAX_LOGIT_BIAS 300     /* OpenAI's limit on logit_bias entries */
#define MOE_MAX_TOP_LOGPROBS 20    /* OpenAI's limit on top_logprobs */
#define MOE_MAX_CHOICES      16    /* sampling.n_choices limit */

typedef struct {
    float     temperature;         /* 0: greedy; default 1 */
    float     top_p;               /* (0,1], default 1 */
    int       top_k;               /* <= 0: off */
    float     min_p;               /* [0,1], default 0 */
    float     presence_penalty;    /* [-2,2], default 0 */
    float     frequency_penalty;   /* [-2,2], default 0 */
    float     repetition_penalty;  /* > 0, default 1 (HF semantics) */
    uint64_t  seed;
    int       has_seed;            /* 0: seeded from the request id+clock */
    int       max_tokens;          /* tokens to generate, >= 1 */
    int       ignore_eos;
    int32_t   stop_token_ids[MOE_MAX_STOP_IDS];
    int       n_stop_token_ids;
    int       logprobs;            /* 1: TOKEN events carry the token's
                                      log-probability (costs a pass over the
                                      vocabulary); 0: logprob is 0 */
    /* logit_bias: logit_bias[i] (in [-100, 100]) is added to the logit of
     * token logit_bias_ids[i] (in [0, vocab)) before penalties, temperature
     * and greedy; a sequence with any takes the host sampler.  The arrays
     * (n_logit_bias <= MOE_MAX_LOGIT_BIAS entries each) are the caller's:
     * moe_engine_submit() copies them, so they need to live only until it
     * returns; the submit ring carries a pointer, not 300 entries a slot. */
    const int32_t *logit_bias_ids;
    const float   *logit_bias;
    int       n_logit_bias;
    /* guided decoding: NULL = none.  moe_engine_submit() takes its own
     * reference (released when the sequence ends); the caller keeps and
     * releases its own (forked choices take one each). */
    moe_guide_t *guide;

    /* ---- logprobs detail (issue 10 item 4) ----
     * top_logprobs (0..MOE_MAX_TOP_LOGPROBS, needs logprobs): TOKEN events
     * also carry (ev.lp) the top entries of the distribution the token was
     * drawn from.  prompt_logprobs (0/1): one MOE_EV_PROMPT event before
     * the first token gives each prompt token's logprob given its prefix
     * (and top_logprobs entries per position); the prompt is then
     * prefilled one position per step and skips the prefix cache. */
    int       top_logprobs;
    int       prompt_logprobs;

    /* ---- several choices (issue 10 item 5) ----
     * n_choices (0 or 1: one; up to MOE_MAX_CHOICES and max_num_seqs):
     * the request is prefilled once, then forked into n_choices sequences
     * that share the prompt's KV blocks (reference counts; the last
     * partial block copied for each).  Choice i draws from its own stream
     * (seed + i when seeded) and gets its own TOKEN and FINISH events
     * (moe_event_t.index); the request has ended when every choice sent
     * its FINISH or ERROR.  FINISH n_prompt / n_cached are the request's
     * (count them once), n_generated the choice's. */
    int       n_choices;
} moe_sampling_t;

void moe_sampling_defaults(moe_sampling_t *sp);


/* ----------------------------------------------------------------- engine */

typedef struct moe_engine moe_engine_t;

typedef struct {
    char     served_name[MOE_NAME_MAX];  /* /v1/models id */
    char     model_path[MOE_PATH_MAX];
    char     architecture[64];           /* "MixtralForCausalLM", ... */
    char     backend[16];                /* "cpu" | "cuda" */
    int      vocab_size;
    int      max_model_len;
    int      n_layers;
    int      n_experts;                  /* 1 for dense models */
    int      top_k;
    int      hidden_size;
    int32_t  eos_ids[8];                 /* from generation_config.json */
    int      n_eos;
    int      block_size;
    int      kv_blocks_total;
    char     kv_cache_dtype[16];         /* the KV values: "float32",
                                            "bfloat16" or "fp8_e4m3" */
    const char *chat_template;           /* NULL: ChatML */
    long     created;                    /* unix time the model loaded */
} moe_model_info_t;

typedef enum {
    MOE_EV_TOKEN  = 1,   /* one generated token */
    MOE_EV_FINISH = 2,   /* sequence ended; usage counts are final */
    MOE_EV_ERROR  = 3,   /* sequence failed; status says why */
    MOE_EV_PROMPT = 4    /* sampling.prompt_logprobs: ev.lp holds one row
                            per prompt token, before the first TOKEN */
} moe_event_type_t;

/*
 * Log-probabilities riding on an event (moe_event_t.lp): a side record so
 * that events of requests that ask for none stay small.  Logprobs are of
 * the distribution the token was drawn from: the logits after logit_bias
 * and the penalties, divided by the temperature (1 when greedy), over the
 * whole vocabulary (before top-k / top-p / min-p truncation), as vLLM
 * reports them.  Prompt rows: the raw model distribution (no bias, no
 * penalties, temperature 1).
 */
typedef struct {
    int32_t  id;
    float    logprob;
} moe_logprob_entry_t;

typedef struct {
    int32_t              n_rows;   /* 1 for a TOKEN; n_prompt for PROMPT */
    int32_t              k;        /* top entries per row (0..20) */
    int32_t             *token;    /* (n_rows) the row's token */
    float               *logprob;  /* (n_rows) its logprob; PROMPT row 0
                                      (no prefix): NAN */
    moe_logprob_entry_t *top;      /* (n_rows, k) logprob descending, ties
                                      by ascending id; PROMPT row 0: all
                                      id -1 */
} moe_logprobs_t;

typedef enum {
    MOE_FINISH_NONE      = 0,
    MOE_FINISH_STOP      = 1,   /* EOS or a stop token id */
    MOE_FINISH_LENGTH    = 2,   /* max_tokens or max_model_len */
    MOE_FINISH_CANCELLED = 3,   /* moe_engine_cancel() */
    MOE_FINISH_ERROR     = 4
} moe_finish_t;

typedef struct {
    uint64_t  req_id;
    int32_t   type;            /* moe_event_type_t */
    int32_t   token;           /* TOKEN: the id; FINISH on EOS: the EOS id,
                                  else -1 */
    int32_t   finish_reason;   /* FINISH: moe_finish_t */
    int32_t   status;          /* ERROR: a moe status */
    int32_t   n_prompt;        /* FINISH: prompt tokens */
    int32_t   n_cached;        /* FINISH: prompt tokens served from the
                                  prefix cache */
    int32_t   n_generated;     /* FINISH: tokens sampled, EOS included */
    float     logprob;         /* TOKEN: log-probability of the token
                                  (when sampling.logprobs), else 0 */
    int32_t   index;           /* the choice (0..n_choices-1) */
    moe_logprobs_t *lp;        /* TOKEN with top_logprobs > 0, PROMPT: a
                                  malloc()ed record the drainer owns and
                                  frees with moe_event_release(); else
                                  NULL */
} moe_event_t;

/* Free what an event owns (ev->lp) and clear it.  Safe on any event. */
void moe_event_release(moe_event_t *ev);

typedef struct {
    int64_t  kv_blocks_total;      /* usable now (grows: kv_blocks_pending) */
    int64_t  kv_blocks_pending;    /* blocks the pool still waits for (a
                                      start beside the old worker) */
    int64_t  kv_blocks_used;
    int64_t  kv_blocks_cached;     /* free but holding a cached prefix */
    int64_t  block_size;
    int64_t  kv_bytes_per_block;
    int64_t  weights_bytes;
    int64_t  seqs_running;
    int64_t  seqs_waiting;
    int64_t  requests_submitted;
    int64_t  requests_finished;
    int64_t  requests_cancelled;
    int64_t  prompt_tokens_total;
    int64_t  generated_tokens_total;
    int64_t  cached_tokens_total;
    int64_t  steps;
    int64_t  busy_ns;              /* engine time spent in forward+sample */
    int64_t  preemptions;          /* preemptions by recompute */
    int64_t  submit_ring_free;
    /* preemption by swapping to host memory (swap_space) */
    int64_t  swap_outs;            /* sequences swapped out, total */
    int64_t  swap_ins;             /* sequences swapped back in, total */
    int64_t  swap_blocks_out;      /* KV blocks copied to host, total */
    int64_t  seqs_swapped;         /* sequences in host memory now */
    int64_t  swap_slots_total;     /* host swap pool, in blocks; 0: off */
    int64_t  swap_slots_used;
    /* tokens of non-greedy requests drawn by the backend (on the GPU for
     * cuda) rather than by the host sampler over copied logits */
    int64_t  backend_sampled_tokens;
    /* tokens (greedy too) drawn by the engine's host sampler over logits
     * copied from the backend: 0 while every sequence's plan keeps its
     * logits on the backend (greedy, sampled, guided, logprobs,
     * logit_bias on the CUDA backend) */
    int64_t  host_sampled_tokens;
    /* stall-free batching: steps whose prefill chunks the step cost model
     * cut, and the model itself (ns = c0 + c1 tokens + c2 attn, attn in
     * 1024 query x context pairs; all 0 until it is warm) */
    int64_t  prefill_limited_steps;
    double   step_cost_ns[3];
} moe_stats_t;

/*
 * Load the model named by cfg (vllm.model_name, resolved), pick the backend
 * (cfg->backend; "auto" = cuda when built with CUDA and a GPU is present),
 * size the KV cache, and start the engine thread.  Start-up failures
 * (missing file, malformed tensor, out of memory) return a status with err
 * naming the file and tensor.  cfg is copied.
 */
int moe_engine_create(const moe_config_t *cfg, moe_engine_t **out,
    char *err, size_t errlen);

/* Stop the engine thread, free everything.  NULL is a no-op. */
void moe_engine_destroy(moe_engine_t *e);

/*
 * A graceful exit (nginx -s reload): wait at most timeout_ms for the next
 * worker to take this engine's weights (CUDA, shared through a file
 * descriptor; a hand-over that already happened returns at once).
 * 1 taken (*pid the taker, *ms the hand-over's duration), 0 nobody came,
 * -1 nothing is shared (CPU backend, tensor parallel ranks, a driver
 * without VMM, MOE_CUDA_SHARE=0).  Any thread; before moe_engine_destroy.
 */
int moe_engine_handover_wait(moe_engine_t *e, int timeout_ms, int64_t *pid,
    double *ms);

/* Readable (EPOLLIN) when events are waiting; moe_engine_drain() clears it
 * when it takes the last waiting event (it stays readable after a drain that
 * filled its array with more still waiting).  Non-blocking, close-on-exec;
 * owned by the engine. */
int moe_engine_eventfd(const moe_engine_t *e);

const moe_model_info_t *moe_engine_info(const moe_engine_t *e);
const moe_tokenizer_t  *moe_engine_tokenizer(const moe_engine_t *e);

/*
 * Queue a request.  prompt is copied.  Returns MOE_OK, MOE_EFULL (submit
 * ring full: answer 503), MOE_EINVAL (empty prompt, id out of vocab, bad
 * params) or MOE_ETOOLONG (prompt longer than max_model_len - 1).  The
 * request's events then arrive through moe_engine_drain(), ending with
 * exactly one FINISH or ERROR event.  req_id must be unique among live
 * requests.
 */
int moe_engine_submit(moe_engine_t *e, uint64_t req_id,
    const int32_t *prompt, int n_prompt, const moe_sampling_t *sp);

/*
 * Ask the engine to drop a request and free its KV blocks within one step.
 * The request still gets a FINISH event (reason CANCELLED) unless it had
 * already finished.  MOE_EFULL: ring full, call again later.
 */
int moe_engine_cancel(moe_engine_t *e, uint64_t req_id);

/*
 * The same for one choice of a request with n_choices > 1 (a stop string
 * ended it): that choice's sequence is dropped (FINISH CANCELLED for its
 * index), the others go on.  index -1: every choice, as moe_engine_cancel.
 */
int moe_engine_cancel_choice(moe_engine_t *e, uint64_t req_id, int index);

/*
 * Hold the engine thread, for tests that must fix what the scheduler sees
 * at once rather than hope for it: after moe_engine_hold(e, n) with n >= 0
 * the engine takes at most n more scheduler steps, then parks between two
 * steps, before it reads the submit ring again (submits and cancels queued
 * meanwhile wait there, and all of them are read together when it goes
 * on).  n == 0 returns once the engine is parked (its stats are then those
 * after its last step).  n < 0 releases it (the default state).  Called
 * from the producer thread.  MOE_ESTATE when the engine thread is not
 * running.
 */
int moe_engine_hold(moe_engine_t *e, int steps);

/*
 * Fix the step cost model stall-free batching uses (ns per step =
 * c0 + c1 x tokens + c2 x attention pairs / 1024) instead of measuring
 * it; c1 <= 0 goes back to measuring.  For tests and for operators who
 * want a fixed pace.  Only while the engine is parked (moe_engine_hold(e,
 * 0)): MOE_ESTATE otherwise.
 */
int moe_engine_pin_step_cost(moe_engine_t *e, double c0, double c1,
    double c2);

/* Copy up to max waiting events into ev; returns how many.  Non-blocking.
 * Events left waiting (the return was max) keep the eventfd readable, so
 * one drain per wake-up loses none. */
size_t moe_engine_drain(moe_engine_t *e, moe_event_t *ev, size_t max);

/* Snapshot of counters (read with atomics; any thread). */
void moe_engine_stats(const moe_engine_t *e, moe_stats_t *out);

/*
 * Per-expert routing counts: fills counts[layer * n_experts + expert] with
 * tokens routed there since start.  n is the array length; returns the
 * number of entries written (n_layers * n_experts) or a negative status.
 */
int moe_engine_expert_counts(const moe_engine_t *e, int64_t *counts,
    size_t n);

/*
 * Expert-parallel load: fills tokens[r] with the (token, expert) rows
 * that rank r's experts computed since start, summed over the layers
 * (from the routing counts and the contiguous placement, E / ranks
 * experts each).  n is the array length.  Returns the number of ranks
 * written; 0 when the backend is not expert parallel; MOE_EINVAL when n
 * is too small.
 */
int moe_engine_rank_load(const moe_engine_t *e, int64_t *tokens, int n);
/* ---------------------------------------------------------------------
 * Prefix affinity key (engine/text/prefix_key.c), for a front nginx that
 * routes conversations to the node holding their prefix in its KV cache.
 * Pure computation on request bytes: no engine, no model, no tokenizer.
 *
 * The key covers the stable start of a request body, as a canonical byte
 * string clipped to `budget` bytes:
 *   chat ("messages"): role and text of each message up to and including
 *     the first "user" message (text parts of array contents joined), so
 *     later turns of a conversation, which repeat those messages and add
 *     more, give the same key;
 *   completions ("prompt"): the prompt's text (the first prompt of an
 *     array), or its token ids written in decimal.
 * JSON escapes are decoded first, so the same text spelled differently
 * gives the same key.  The body may be fed in pieces (a spilled body is
 * read in chunks); feeding stops being useful once the key is complete.
 * --------------------------------------------------------------------- */

typedef struct moe_prefix_key_s  moe_prefix_key_t;

/* A fresh key computation over at most `budget` canonical bytes (0 picks
 * 1024).  malloc()ed; free with moe_prefix_key_destroy.  NULL on ENOMEM. */
moe_prefix_key_t *moe_prefix_key_create(size_t budget);

/* Feeds the next len bytes of the body.  Returns 1 when the key is
 * complete (more input would not change it), 0 when more input may
 * matter, MOE_EINVAL when the body is not JSON (the key is then absent
 * for good), MOE_ENOMEM. */
int moe_prefix_key_feed(moe_prefix_key_t *k, const void *data, size_t len);

/* Ends the input (the body is over, or the caller read all it will).
 * MOE_OK with *hash set (a 64-bit hash of the canonical prefix) when the
 * body yielded a prefix; MOE_EINVAL when it did not (not JSON, no
 * "messages" or "prompt", a body cut before the prefix was complete). */
int moe_prefix_key_finish(moe_prefix_key_t *k, uint64_t *hash);

/* Frees k (NULL is fine). */
void moe_prefix_key_destroy(moe_prefix_key_t *k);

#ifdef __cplusplus
}
#endif

#endif /* MOE_H */
