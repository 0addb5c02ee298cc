/*
 * libFuzzer harness: the YAML server configuration
 * (engine/config/config.c, libyaml's document API).
 *
 * The input is written as conf.yaml in a directory that also holds a
 * model directory "m" (m/config.json) and a template file "tpl.jinja", so
 * that model_name / vllm_instances / chat_template / key-file values can
 * resolve.  moe_config_load() must either fail with a message that starts
 * with "<file>:" (file:line: reason, or file: reason when no line
 * applies) or succeed with a configuration inside its documented ranges:
 * a resolved model path, tensor_parallel_size 1..MOE_MAX_GPUS, block_size
 * a power of two up to 256, gpu_memory_utilization in (0, 1], at most
 * MOE_MAX_INSTANCES instances each with a resolved path and distinct GPUs,
 * at most MOE_MAX_API_KEYS keys, every string terminated in its buffer.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_files.h"

#define TERMINATED(buf)  (memchr((buf), '\0', sizeof(buf)) != NULL)

static moe_config_t  conf;


static void
setup(void)
{
    char  p[128];

    ff_path(p, sizeof(p), "m");
    FF_CHECK(mkdir(p, 0700) == 0, "mkdir %s", p);
    ff_path(p, sizeof(p), "m/config.json");
    ff_write(p, "{}\n", 3);
    ff_path(p, sizeof(p), "tpl.jinja");
    ff_write(p, "{{ messages }}\n", 15);
}


static void
check_config(const moe_config_t *c)
{
    int  i, j, k;

    FF_CHECK(TERMINATED(c->model_name) && TERMINATED(c->model_path)
             && TERMINATED(c->served_model_name)
             && TERMINATED(c->chat_template)
             && TERMINATED(c->chat_template_file)
             && TERMINATED(c->quantization) && TERMINATED(c->load_format)
             && TERMINATED(c->kv_cache_dtype)
             && TERMINATED(c->tool_call_parser) && TERMINATED(c->backend)
             && TERMINATED(c->nccl) && TERMINATED(c->quantization_type)
             && TERMINATED(c->api_key_file)
             && TERMINATED(c->admin_api_key_file), "unterminated string");
    FF_CHECK(c->model_path[0] == '/', "model path '%s'", c->model_path);
    FF_CHECK(c->served_model_name[0] != '\0', "no served name");
    FF_CHECK(c->tensor_parallel_size >= 1
             && c->tensor_parallel_size <= MOE_MAX_GPUS, "tp %d",
             c->tensor_parallel_size);
    FF_CHECK(c->block_size >= 1 && c->block_size <= 256
             && (c->block_size & (c->block_size - 1)) == 0, "block_size %d",
             c->block_size);
    FF_CHECK(c->gpu_memory_utilization > 0
             && c->gpu_memory_utilization <= 1, "gmu %g",
             c->gpu_memory_utilization);
    FF_CHECK(c->max_num_seqs >= 1 && c->max_waiting_requests >= 1,
             "max_num_seqs %d, max_waiting_requests %d", c->max_num_seqs,
             c->max_waiting_requests);
    FF_CHECK(c->n_instances >= 0 && c->n_instances <= MOE_MAX_INSTANCES,
             "n_instances %d", c->n_instances);
    FF_CHECK(c->n_api_keys >= 0 && c->n_api_keys <= MOE_MAX_API_KEYS
             && c->n_admin_api_keys >= 0
             && c->n_admin_api_keys <= MOE_MAX_API_KEYS, "keys %d %d",
             c->n_api_keys, c->n_admin_api_keys);
    for (i = 0; i < c->n_api_keys; i++) {
        FF_CHECK(TERMINATED(c->api_keys[i]) && c->api_keys[i][0] != '\0',
                 "api key %d", i);
    }
    for (i = 0; i < c->n_instances; i++) {
        const moe_instance_conf_t *in = &c->instances[i];

        FF_CHECK(TERMINATED(in->model_path) && in->model_path[0] == '/',
                 "instance %d path", i);
        FF_CHECK(in->tensor_parallel_size >= 1
                 && in->tensor_parallel_size <= MOE_MAX_GPUS,
                 "instance %d tp %d", i, in->tensor_parallel_size);
        FF_CHECK(in->n_gpu_devices >= 0
                 && in->n_gpu_devices <= MOE_MAX_GPUS, "instance %d gpus",
                 i);
        for (j = 0; j < in->n_gpu_devices; j++) {
            FF_CHECK(in->gpu_devices[j] >= 0
                     && in->gpu_devices[j] < MOE_MAX_GPUS, "gpu %d",
                     in->gpu_devices[j]);
            for (k = 0; k < j; k++) {
                FF_CHECK(in->gpu_devices[k] != in->gpu_devices[j],
                         "gpu twice");
            }
        }
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int  ready;
    char        path[128], prefix[160], err[1024];
    int         rc;

    if (!ready) {
        setup();
        ready = 1;
    }
    ff_path(path, sizeof(path), "conf.yaml");
    ff_write(path, data, size);

    err[0] = '\0';
    rc = moe_config_load(path, &conf, err, sizeof(err));
    if (rc != MOE_OK) {
        snprintf(prefix, sizeof(prefix), "%s:", path);
        FF_CHECK(strncmp(err, prefix, strlen(prefix)) == 0,
                 "error does not start with the file: %s", err);
        FF_CHECK(strlen(err) > strlen(prefix) + 1, "empty reason: %s", err);
        return 0;
    }
    check_config(&conf);
    return 0;
}
