/*
 * yajl tree helpers shared by the rooms that read JSON documents
 * (config.json, tokenizer.json, quantization_config, JSON Schemas, tool
 * calls).  util/ includes nothing of the engine: any room may use it.
 */

#ifndef MOE_UTIL_JSON_H
#define MOE_UTIL_JSON_H

#include <stddef.h>

#include <yajl/yajl_tree.h>

/*
 * Deepest nesting of arrays and objects a document may have.  yajl builds
 * its tree without recursion, but yajl_tree_free() recurses once per
 * level: a file of a few hundred KB of '[' overflows the stack.  Real
 * config.json, tokenizer.json, safetensors headers and JSON Schemas nest
 * fewer than 20 levels.
 */
#define MOE_JSON_MAX_DEPTH  512

/*
 * yajl_tree_parse() of '\0'-terminated text, first refusing text nested
 * deeper than MOE_JSON_MAX_DEPTH (counted outside strings).  NULL on
 * failure, with a one-line reason in msg (msglen bytes; msg may be NULL).
 * The caller frees the tree with yajl_tree_free().
 */
yajl_val moe_json_parse(const char *text, char *msg, size_t msglen);

/* The value of key in object obj (first match); NULL when obj is NULL,
 * not an object, or has no such key. */
yajl_val moe_json_get(const struct yajl_val_s *obj, const char *key);

#endif /* MOE_UTIL_JSON_H */
