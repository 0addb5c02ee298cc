/*
 * yajl tree helpers shared by the rooms that read JSON documents
 * (config.json, tokenizer.json, quantization_config, JSON Schemas, tool
 * calls).  util/ includes nothing of the engine: any room may use it.
 */

#ifndef MOE_UTIL_JSON_H
#define MOE_UTIL_JSON_H

#include <yajl/yajl_tree.h>

/* The value of key in object obj (first match); NULL when obj is NULL,
 * not an object, or has no such key. */
yajl_val moe_json_get(const struct yajl_val_s *obj, const char *key);

#endif /* MOE_UTIL_JSON_H */
