/*
 * Checks the YAML configuration loader (engine/config/config.c):
 *   - moe_config_defaults() gives the defaults documented in moe.h;
 *   - conf/localmoe.yaml (the seed's config.yaml sections) loads and every
 *     seed value lands in its field; when models/localmoe-kjv is not there
 *     yet, a copy of it pointing at the fake model in t/data/conf/models is
 *     loaded instead (diagnostics say which);
 *   - the seed's recommended configurations (large, medium, several
 *     instances, local path) load with their values; its tuning advice
 *     (quantization "awq", accepted here and checked against the model's
 *     quantization_config at load, t/quant.t) fails only for want of a
 *     model;
 *   - a key of every type, model path resolution (YAML dir, its parent,
 *     models/<org>/<name>, absolute);
 *   - the server: section (API keys: one, a list, key files resolved
 *     against the YAML's directory); its errors never quote a key;
 *   - a table of bad files in t/data/conf/ each fails with the expected
 *     status, "<file>:<line>: " prefix and reason substring; a section of
 *     100000 keys is refused by count (in seconds, not minutes).
 * The source tree is found from argv[0] (build/t/config) or $MOE_SRCDIR.
 */

#include <limits.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "moe.h"
#include "tap.h"

static char  root[PATH_MAX];
static char  data[PATH_MAX + 32];


typedef struct {
    const char  *file;      /* in t/data/conf */
    int          line;      /* expected line in the message */
    int          status;
    const char  *reason;    /* substring of the message */
} bad_case_t;

static const bad_case_t bad_cases[] = {
    { "bad_unknown_key.yaml", 4, MOE_EINVAL,
      "unknown key 'foo' in section 'vllm'" },
    { "bad_int_type.yaml", 3, MOE_EINVAL,
      "block_size: expected an integer, got 'abc'" },
    { "bad_int_quoted.yaml", 3, MOE_EINVAL,
      "max_num_seqs: expected an integer, got '\"4\"'" },
    { "bad_int_float.yaml", 2, MOE_EINVAL,
      "num_experts: expected an integer, got '8.0'" },
    { "bad_gmu_range.yaml", 4, MOE_EINVAL,
      "gpu_memory_utilization must be in (0, 1], got 1.5" },
    { "bad_gmu_zero.yaml", 2, MOE_EINVAL,
      "gpu_memory_utilization must be in (0, 1], got 0" },
    { "bad_dup_key.yaml", 5, MOE_EINVAL,
      "duplicate key 'block_size' in section 'vllm' (first at line 3)" },
    { "bad_dup_section.yaml", 5, MOE_EINVAL, "duplicate key 'vllm'" },
    { "bad_section.yaml", 3, MOE_EINVAL, "unknown section 'deepspeed'" },
    { "bad_section_type.yaml", 3, MOE_EINVAL,
      "section 'vllm' must be a mapping" },
    { "bad_syntax.yaml", 4, MOE_EFORMAT, "YAML syntax error: " },
    { "bad_syntax_flow.yaml", 4, MOE_EFORMAT, "YAML syntax error: " },
    { "bad_no_model.yaml", 1, MOE_EINVAL, "no model: set vllm.model_name" },
    { "bad_model_missing.yaml", 4, MOE_EIO,
      "model 'nowhere/none' not found" },
    { "bad_model_noconfig.yaml", 2, MOE_EIO, "model 'models' not found" },
    { "bad_quant_squeezellm.yaml", 3, MOE_EUNSUPPORTED,
      "quantization 'squeezellm' is not supported by this build" },
    { "bad_quant_unknown.yaml", 3, MOE_EINVAL,
      "quantization must be null or awq, gptq, fp8, compressed-tensors, "
      "awq_marlin, gptq_marlin, squeezellm, marlin, bitsandbytes, gguf, got "
      "'\"int4\"'" },
    { "bad_quant_bnb.yaml", 3, MOE_EUNSUPPORTED,
      "quantization 'bitsandbytes' is not supported by this build (awq, "
      "gptq, fp8, compressed-tensors, awq_marlin, gptq_marlin or null)" },
    { "bad_load_format.yaml", 3, MOE_EINVAL,
      "load_format must be auto, safetensors, dummy, got '\"pt\"'" },
    { "bad_tool_call_parser.yaml", 3, MOE_EINVAL,
      "tool_call_parser must be auto, hermes, mistral, llama3_json, none, "
      "got 'pythonic'" },
    { "bad_block_size.yaml", 3, MOE_EINVAL,
      "block_size must be a power of two in 1..256, got 24" },
    { "bad_block_big.yaml", 3, MOE_EINVAL,
      "block_size must be a power of two in 1..256, got 512" },
    { "bad_bool.yaml", 3, MOE_EINVAL,
      "enable_prefix_caching: expected a boolean (true/false), got 'maybe'" },
    { "bad_bool_quoted.yaml", 2, MOE_EINVAL,
      "enable_compilation: expected a boolean" },
    { "bad_tp.yaml", 3, MOE_EINVAL,
      "tensor_parallel_size must be in 1..16, got 0" },
    { "bad_swap.yaml", 3, MOE_EINVAL, "swap_space must be >= 0, got -1" },
    { "bad_seqs.yaml", 3, MOE_EINVAL, "max_num_seqs must be >= 1, got 0" },
    { "bad_ring_size.yaml", 4, MOE_EINVAL,
      "ring_size must be a power of two in 16..1048576, got 1000" },
    { "bad_step_ratio.yaml", 4, MOE_EINVAL,
      "prefill_step_ratio must be in [0, 1000], got -1" },
    { "bad_backend.yaml", 4, MOE_EINVAL,
      "backend must be auto, cpu, cuda, got 'tpu'" },
    { "bad_qtype.yaml", 2, MOE_EINVAL,
      "quantization_type must be fp16, bf16, fp32, got 'int8'" },
    { "bad_topk.yaml", 3, MOE_EINVAL,
      "top_k_experts (4) is larger than num_experts (2)" },
    { "bad_expert_parallel.yaml", 5, MOE_EINVAL,
      "expert_parallel: tensor_parallel_size 3 does not divide "
      "num_experts 8" },
    { "bad_nccl.yaml", 4, MOE_EINVAL,
      "nccl must be auto, on, off, got 'maybe'" },
    { "bad_inst_len.yaml", 4, MOE_EINVAL,
      "gpu_devices has 3 entries but tensor_parallel_size is 2" },
    { "bad_inst_dup_gpu.yaml", 7, MOE_EINVAL,
      "GPU 1 is already used by vllm_instances entry 1 (line 3)" },
    { "bad_inst_neg.yaml", 4, MOE_EINVAL, "GPU -1 out of range 0..15" },
    { "bad_inst_key.yaml", 3, MOE_EINVAL,
      "unknown key 'gpus' in section 'vllm_instances'" },
    { "bad_inst_no_name.yaml", 3, MOE_EINVAL,
      "vllm_instances entry 2 has no model_name" },
    { "bad_inst_too_many.yaml", 18, MOE_EINVAL,
      "vllm_instances: more than 8 instances" },
    { "bad_inst_missing_model.yaml", 4, MOE_EIO,
      "model 'acme/missing' not found" },
    { "bad_two_docs.yaml", 3, MOE_EINVAL, "more than one YAML document" },
    { "bad_top_list.yaml", 1, MOE_EINVAL,
      "the top level must be a mapping" },
    { "bad_served_twice.yaml", 5, MOE_EINVAL,
      "served_model_name given twice (first at line 3)" },
    { "bad_waiting.yaml", 4, MOE_EINVAL,
      "max_waiting_requests must be >= 1, got 0" },
    { "bad_chat_template.yaml", 3, MOE_EIO,
      "chat_template 'no-such-template.jinja' is neither a Jinja template" },
    { "bad_chat_template_empty.yaml", 3, MOE_EINVAL,
      "chat_template is empty" },
    { "bad_server_key.yaml", 4, MOE_EINVAL,
      "unknown key 'apikey' in section 'server'" },
    { "bad_server_key_type.yaml", 5, MOE_EINVAL,
      "api_key: expected a key or a list of keys" },
    { "bad_server_key_empty.yaml", 4, MOE_EINVAL,
      "admin_api_key: a key must be 1 to 255 bytes (value not shown)" },
    { "bad_server_key_file.yaml", 4, MOE_EINVAL,
      "api_key_file: expected a file name" },
    { "seed_tuning.yaml", 3, MOE_EINVAL,
      "no model: set vllm.model_name" },
};


/* Load t/data/conf/<name>; returns the status, err filled. */
static int
load(const char *name, moe_config_t *c, char *err, size_t errlen,
    char *path, size_t pathlen)
{
    snprintf(path, pathlen, "%s/%s", data, name);
    return moe_config_load(path, c, err, errlen);
}


static int
ends_with(const char *s, const char *tail)
{
    size_t  a = strlen(s), b = strlen(tail);

    return a >= b && strcmp(s + a - b, tail) == 0;
}


static int
is_dir(const char *p)
{
    struct stat  st;

    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}


/* Finds the source tree: $MOE_SRCDIR, else three levels above argv[0]. */
static int
find_root(const char *argv0)
{
    const char  *env = getenv("MOE_SRCDIR");
    char         buf[PATH_MAX], *s;
    int          i;

    if (env != NULL && *env != '\0') {
        if (realpath(env, root) == NULL) {
            return -1;
        }
    } else {
        if (realpath(argv0, buf) == NULL) {
            return -1;
        }
        for (i = 0; i < 3; i++) {
            s = strrchr(buf, '/');
            if (s == NULL || s == buf) {
                return -1;
            }
            *s = '\0';
        }
        strcpy(root, buf);
    }

    snprintf(data, sizeof(data), "%s/t/data/conf", root);

    return is_dir(data) ? 0 : -1;
}


/*
 * Copy conf/localmoe.yaml to a temporary file with vllm.model_name set to
 * `model`.  Returns 0 and the file's name in out.
 */
static int
copy_conf(const char *model, char *out, size_t outlen)
{
    char   src[PATH_MAX + 32], line[1024];
    FILE  *in, *o;
    int    fd, n = 0;

    snprintf(src, sizeof(src), "%s/conf/localmoe.yaml", root);
    snprintf(out, outlen, "/tmp/moe_config_test_XXXXXX.yaml");

    fd = mkstemps(out, 5);
    if (fd < 0) {
        return -1;
    }

    in = fopen(src, "r");
    o = fdopen(fd, "w");
    if (in == NULL || o == NULL) {
        if (in) {
            fclose(in);
        }
        if (o) {
            fclose(o);
        } else {
            close(fd);
        }
        return -1;
    }

    while (fgets(line, sizeof(line), in) != NULL) {
        if (strstr(line, "  model_name: \"models/localmoe-kjv\"") == line) {
            fprintf(o, "  model_name: \"%s\"\n", model);
            n++;
        } else {
            fputs(line, o);
        }
    }

    fclose(in);
    fclose(o);

    return n == 1 ? 0 : -1;
}


/* conf/localmoe.yaml's seed values. */
static int
check_seed_values(const moe_config_t *c)
{
    return c->num_experts == 8 && c->top_k_experts == 2
           && c->hidden_size == 768 && c->intermediate_size == 3072
           && c->max_sequence_length == 2048
           && strcmp(c->quantization_type, "fp16") == 0
           && c->enable_compilation == 1
           && c->tensor_parallel_size == 4
           && c->gpu_memory_utilization == 0.9
           && c->max_model_len == 2048 && c->block_size == 16
           && c->swap_space == 4 && c->max_num_batched_tokens == 8192
           && c->enable_prefix_caching == 1 && c->quantization[0] == '\0'
           && strcmp(c->backend, "auto") == 0
           /* not in the file: defaults */
           && c->max_num_seqs == 256 && c->enable_chunked_prefill == 1
           && c->ring_size == 4096 && strcmp(c->load_format, "auto") == 0
           && c->n_instances == 0
           /* admission: 4 x max_num_seqs, no token budget */
           && c->max_waiting_requests == 1024 && c->max_waiting_tokens == 0
           && c->chat_template[0] == '\0'
           && c->chat_template_file[0] == '\0'
           /* tool calling: parser from the model, auto choice on */
           && strcmp(c->tool_call_parser, "auto") == 0
           && c->enable_auto_tool_choice == 1;
}


int
main(int argc, char **argv)
{
    static moe_config_t  c;
    char                 err[2048], path[PATH_MAX + 64], tmp[256];
    char                 want[2 * PATH_MAX], fake[PATH_MAX + 64];
    const bad_case_t    *b;
    size_t               i, n_bad;
    int                  rc, ok;

    (void) argc;

    n_bad = sizeof(bad_cases) / sizeof(bad_cases[0]);

    TAP_PLAN(20 + n_bad);

    if (find_root(argv[0]) != 0) {
        TAP_DIAG("cannot find the source tree (t/data/conf) from %s; "
                 "set MOE_SRCDIR", argv[0]);
        return 1;
    }
    TAP_DIAG("source tree %s", root);

    snprintf(fake, sizeof(fake), "%s/models/fake", data);

    /* ---- defaults */

    moe_config_defaults(&c);
    TAP_OK(c.num_experts == -1 && c.top_k_experts == -1
           && c.hidden_size == -1 && c.intermediate_size == -1
           && c.max_sequence_length == -1 && c.quantization_type[0] == '\0'
           && c.enable_compilation == 1 && c.model_name[0] == '\0'
           && c.tensor_parallel_size == 1
           && c.gpu_memory_utilization == 0.9 && c.max_model_len == 0
           && c.block_size == 16 && c.swap_space == 4
           && c.max_num_batched_tokens == 8192 && c.max_num_seqs == 256
           && c.enable_prefix_caching == 1 && c.enable_chunked_prefill == 1
           && c.max_chunked_prefill_tokens == 0 && c.quantization[0] == '\0'
           && c.trust_remote_code == 0
           && strcmp(c.load_format, "auto") == 0
           && strcmp(c.backend, "auto") == 0 && c.cpu_threads == 0
           && c.kv_cache_blocks == 0 && c.ring_size == 4096
           && c.prefill_step_ratio == 5.0
           && c.n_instances == 0,
           "moe_config_defaults() matches moe.h");

    /* ---- conf/localmoe.yaml */

    snprintf(path, sizeof(path), "%s/models/localmoe-kjv/config.json",
             root);
    if (access(path, F_OK) == 0) {
        snprintf(path, sizeof(path), "%s/conf/localmoe.yaml", root);
        rc = moe_config_load(path, &c, err, sizeof(err));
        snprintf(want, sizeof(want), "%s/models/localmoe-kjv", root);
        TAP_OK(rc == MOE_OK && check_seed_values(&c)
               && strcmp(c.model_name, "models/localmoe-kjv") == 0
               && strcmp(c.model_path, want) == 0
               && strcmp(c.served_model_name, c.model_name) == 0,
               "conf/localmoe.yaml loads, seed values kept, model at %s",
               want);
        if (rc != MOE_OK) {
            TAP_DIAG("%s", err);
        }
    } else {
        TAP_DIAG("models/localmoe-kjv not there yet: loading a copy of "
                 "conf/localmoe.yaml with model_name = %s", fake);
        rc = copy_conf(fake, tmp, sizeof(tmp));
        if (rc == 0) {
            rc = moe_config_load(tmp, &c, err, sizeof(err));
            if (rc != MOE_OK) {
                TAP_DIAG("%s", err);
            }
            unlink(tmp);
        } else {
            TAP_DIAG("could not copy conf/localmoe.yaml (model_name line "
                     "not as expected?)");
            rc = -100;
        }
        TAP_OK(rc == MOE_OK && check_seed_values(&c)
               && strcmp(c.model_path, fake) == 0
               && strcmp(c.served_model_name, fake) == 0,
               "conf/localmoe.yaml (copy, absolute model_name) loads, seed "
               "values kept");
    }

    /* ---- every key */

    rc = load("good_full.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    TAP_OK(rc == MOE_OK && c.num_experts == 4 && c.top_k_experts == 1
           && c.hidden_size == 64 && c.intermediate_size == 128
           && c.max_sequence_length == 512
           && strcmp(c.quantization_type, "bf16") == 0
           && c.enable_compilation == 0
           && strcmp(c.model_name, "models/fake") == 0
           && strcmp(c.model_path, fake) == 0
           && strcmp(c.served_model_name, "tiny") == 0
           && c.tensor_parallel_size == 1
           && c.gpu_memory_utilization == 0.5 && c.max_model_len == 256
           && c.block_size == 8 && c.swap_space == 0.5
           && c.max_num_batched_tokens == 1024 && c.max_num_seqs == 4
           && c.enable_prefix_caching == 0 && c.enable_chunked_prefill == 1
           && c.use_v2_block_manager == 1
           && c.max_chunked_prefill_tokens == 64
           && c.quantization[0] == '\0' && c.trust_remote_code == 0
           && strcmp(c.load_format, "safetensors") == 0
           && strcmp(c.backend, "cpu") == 0 && c.cpu_threads == 2
           && c.cpu_tensor_parallel == 1 && c.kv_cache_blocks == 100 && c.ring_size == 1024
           && c.max_waiting_requests == 16 && c.max_waiting_tokens == 0
           && strcmp(c.file, path) == 0,
           "good_full.yaml: every key of every type lands in its field");

    /* ---- server: the HTTP front's API keys */

    rc = load("good_server.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    snprintf(want, sizeof(want), "%s/keys/users.txt", data);
    TAP_OK(rc == MOE_OK && c.n_api_keys == 1
           && strcmp(c.api_keys[0], "sk-one") == 0
           && c.n_admin_api_keys == 2
           && strcmp(c.admin_api_keys[0], "sk-admin-a") == 0
           && strcmp(c.admin_api_keys[1], "sk-admin-b") == 0
           && strcmp(c.api_key_file, want) == 0
           && strcmp(c.admin_api_key_file, "/etc/localmoe/admin.keys") == 0,
           "good_server.yaml: a key, a list, key files (relative ones "
           "against the YAML's directory)");

    rc = load("bad_server_key_type.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    TAP_OK(rc != MOE_OK && strstr(err, "sk-secret") == NULL,
           "a bad api_key: the message quotes no key");
    rc = load("bad_server_key_empty.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    TAP_OK(rc != MOE_OK && strstr(err, "sk-secret") == NULL,
           "a bad admin_api_key: the message quotes no key");

    /* ---- the seed's recommendations */

    rc = load("seed_large.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    snprintf(want, sizeof(want), "%s/models/meta-llama/Llama-2-70b-chat-hf",
             data);
    TAP_OK(rc == MOE_OK
           && strcmp(c.model_name, "meta-llama/Llama-2-70b-chat-hf") == 0
           && strcmp(c.model_path, want) == 0
           && c.tensor_parallel_size == 4
           && c.gpu_memory_utilization == 0.85 && c.max_model_len == 4096
           && c.max_num_batched_tokens == 16384 && c.block_size == 32
           && c.swap_space == 8,
           "seed large-model config loads (org/name found under models/)");

    rc = load("seed_medium.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    TAP_OK(rc == MOE_OK
           && strcmp(c.model_name, "mistralai/Mistral-7B-Instruct-v0.2") == 0
           && ends_with(c.model_path,
                        "/t/data/conf/models/mistralai/"
                        "Mistral-7B-Instruct-v0.2")
           && c.tensor_parallel_size == 2
           && c.gpu_memory_utilization == 0.9 && c.max_model_len == 8192
           && c.max_num_batched_tokens == 32768,
           "seed medium-model config loads");

    rc = load("seed_multi.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    TAP_OK(rc == MOE_OK && c.n_instances == 2
           && strcmp(c.instances[0].model_name,
                     "codellama/CodeLlama-13b-Instruct-hf") == 0
           && ends_with(c.instances[0].model_path,
                        "/models/codellama/CodeLlama-13b-Instruct-hf")
           && c.instances[0].tensor_parallel_size == 2
           && c.instances[0].n_gpu_devices == 2
           && c.instances[0].gpu_devices[0] == 0
           && c.instances[0].gpu_devices[1] == 1
           && c.instances[0].line == 3
           && strcmp(c.instances[1].model_name,
                     "mistralai/Mistral-7B-Instruct-v0.2") == 0
           && ends_with(c.instances[1].model_path,
                        "/models/mistralai/Mistral-7B-Instruct-v0.2")
           && c.instances[1].n_gpu_devices == 2
           && c.instances[1].gpu_devices[0] == 2
           && c.instances[1].gpu_devices[1] == 3
           && c.instances[1].line == 6,
           "seed multi-instance config loads: 2 instances, GPUs 0,1 / 2,3");
    TAP_OK(rc == MOE_OK
           && strcmp(c.model_name, c.instances[0].model_name) == 0
           && strcmp(c.model_path, c.instances[0].model_path) == 0
           && strcmp(c.served_model_name, c.instances[0].model_name) == 0
           && c.tensor_parallel_size == 2,
           "only vllm_instances: the config's model is the first instance");

    rc = load("seed_local_path.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    snprintf(want, sizeof(want), "%s/models/meta-llama/Llama-2-70b-chat-hf",
             data);
    TAP_OK(rc == MOE_OK && strcmp(c.model_path, want) == 0
           && c.trust_remote_code == 0
           && strcmp(c.load_format, "auto") == 0,
           "seed local-path example (./models/...) loads, realpath'd");

    /* vLLM's Marlin names for AWQ / GPTQ: the same checkpoints here */
    rc = load("quant_gptq_marlin.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    TAP_OK(rc == MOE_OK && strcmp(c.quantization, "gptq") == 0,
           "quantization: gptq_marlin is kept as gptq (%s)",
           rc == MOE_OK ? c.quantization : err);
    rc = load("quant_awq_marlin.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    TAP_OK(rc == MOE_OK && strcmp(c.quantization, "awq") == 0,
           "quantization: AWQ_Marlin (any case) is kept as awq (%s)",
           rc == MOE_OK ? c.quantization : err);

    rc = load("seed_tuning_noquant.yaml", &c, err, sizeof(err), path,
              sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    TAP_OK(rc == MOE_OK && c.gpu_memory_utilization == 0.85
           && c.enable_prefix_caching == 1 && c.use_v2_block_manager == 1
           && c.max_num_batched_tokens == 16384 && c.max_num_seqs == 256
           && c.enable_chunked_prefill == 1
           && c.max_chunked_prefill_tokens == 1024
           && c.quantization[0] == '\0',
           "seed tuning advice loads with quantization: ~");

    /* ---- model path resolution */

    rc = load("sub/parent.yaml", &c, err, sizeof(err), path, sizeof(path));
    if (rc != MOE_OK) {
        TAP_DIAG("%s", err);
    }
    TAP_OK(rc == MOE_OK && strcmp(c.model_path, fake) == 0,
           "model_name found relative to the YAML file's parent directory");

    /* an absolute model_name, and a missing file */
    ok = 0;
    snprintf(tmp, sizeof(tmp), "/tmp/moe_config_abs_XXXXXX.yaml");
    {
        int    fd = mkstemps(tmp, 5);
        FILE  *f = fd >= 0 ? fdopen(fd, "w") : NULL;

        if (f != NULL) {
            fprintf(f, "vllm:\n  model_name: '%s'\n", fake);
            fclose(f);
            rc = moe_config_load(tmp, &c, err, sizeof(err));
            if (rc != MOE_OK) {
                TAP_DIAG("%s", err);
            }
            ok = rc == MOE_OK && strcmp(c.model_path, fake) == 0;
            unlink(tmp);
        } else if (fd >= 0) {
            close(fd);
        }
    }
    TAP_OK(ok, "absolute model_name used as is");

    rc = load("no_such_file.yaml", &c, err, sizeof(err), path, sizeof(path));
    TAP_OK(rc == MOE_EIO && strstr(err, "no_such_file.yaml: cannot open")
           != NULL, "missing file: MOE_EIO, '%s'", err);

    rc = moe_config_load(data, &c, err, sizeof(err));
    TAP_OK(rc == MOE_EIO && strstr(err, "not a regular file") != NULL,
           "a directory as the file: MOE_EIO, '%s'", err);

    /* a tiny err buffer is not overrun and stays terminated */
    memset(err, 'x', sizeof(err));
    rc = load("bad_unknown_key.yaml", &c, err, 8, path, sizeof(path));
    TAP_OK(rc == MOE_EINVAL && strlen(err) == 7 && err[8] == 'x',
           "errlen 8: message cut to 7 bytes, nothing written past it");

    /* a section of 100000 distinct keys: refused by count; the pairwise
     * duplicate check took most of a minute before naming the first
     * unknown key */
    ok = 0;
    snprintf(tmp, sizeof(tmp), "/tmp/moe_config_keys_XXXXXX.yaml");
    {
        int      fd = mkstemps(tmp, 5), k;
        FILE    *f = fd >= 0 ? fdopen(fd, "w") : NULL;
        clock_t  t0;
        double   cpu = 0;

        if (f != NULL) {
            fprintf(f, "vllm:\n");
            for (k = 0; k < 100000; k++) {
                fprintf(f, "  k%d: 1\n", k);
            }
            fclose(f);
            t0 = clock();
            rc = moe_config_load(tmp, &c, err, sizeof(err));
            cpu = (double) (clock() - t0) / CLOCKS_PER_SEC;
            snprintf(want, sizeof(want), "%s:2: section 'vllm' has 100000 "
                     "keys (at most 256)", tmp);
            ok = rc == MOE_EINVAL && strcmp(err, want) == 0 && cpu < 10;
            TAP_DIAG("%.2f s CPU: %s", cpu, err);
            unlink(tmp);
        } else if (fd >= 0) {
            close(fd);
        }
    }
    TAP_OK(ok, "a section of 100000 keys is refused by count, quickly");

    /* ---- bad files */

    for (i = 0; i < n_bad; i++) {
        b = &bad_cases[i];
        err[0] = '\0';
        rc = load(b->file, &c, err, sizeof(err), path, sizeof(path));
        snprintf(want, sizeof(want), "%s:%d: ", path, b->line);
        TAP_OK(rc == b->status && strncmp(err, want, strlen(want)) == 0
               && strstr(err, b->reason) != NULL,
               "%s fails at line %d: %s", b->file, b->line, b->reason);
        if (rc != b->status || strncmp(err, want, strlen(want)) != 0
            || strstr(err, b->reason) == NULL)
        {
            TAP_DIAG("got status %d (want %d): %s", rc, b->status, err);
        } else {
            TAP_DIAG("%s", err + strlen(data) + 1);
        }
    }

    return TAP_DONE();
}
