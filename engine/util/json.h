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
 * The deepest nesting of arrays and objects moe_json_parse() takes: yajl
 * builds a tree without recursion but frees it recursively, so a document
 * of a million '[' (a 2 MB request body) overflows the stack.  128 is also
 * yajl_gen's own limit, so every document parsed can be written back.
 */
#define MOE_JSON_MAX_DEPTH  128

/* The value of key in object obj (first match); NULL when obj is NULL,
 * not an object, or has no such key. */
yajl_val moe_json_get(const struct yajl_val_s *obj, const char *key);

/*
 * yajl_tree_parse() of the NUL-terminated text when its arrays and
 * objects nest at most MOE_JSON_MAX_DEPTH deep (for text a request or a
 * model wrote).  NULL when the text is nested deeper (err: "nested deeper
 * than 128 levels") or malformed (err: yajl's message); err may be NULL.
 * The caller frees the tree with yajl_tree_free().
 */
yajl_val moe_json_parse(const char *text, char *err, size_t errlen);

#endif /* MOE_UTIL_JSON_H */
