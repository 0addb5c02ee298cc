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
 * The deepest nesting of arrays and objects moe_json_parse() takes.  yajl
 * builds its tree without recursion but yajl_tree_free() recurses once
 * per level, so a document of a million '[' (2 MB: a request's
 * guided_json string, a tool call a model wrote, a safetensors header)
 * overflows the stack.  128 is also yajl_gen's own limit, so every
 * document parsed can be written back; real config.json, tokenizer.json,
 * safetensors headers and JSON Schemas nest fewer than 20 levels.
 */
#define MOE_JSON_MAX_DEPTH  128

/* The value of key in object obj (first match); NULL when obj is NULL,
 * not an object, or has no such key. */
yajl_val moe_json_get(const struct yajl_val_s *obj, const char *key);

/*
 * yajl_tree_parse() of '\0'-terminated text, first refusing text nested
 * deeper than MOE_JSON_MAX_DEPTH (brackets counted outside strings, as
 * yajl's lexer sees them).  NULL on failure, with a one-line reason in msg
 * ("nested deeper than 128 levels", or yajl's message with its newlines
 * made spaces; msglen bytes; msg may be NULL).  The caller frees the tree
 * with yajl_tree_free().
 */
yajl_val moe_json_parse(const char *text, char *msg, size_t msglen);

#endif /* MOE_UTIL_JSON_H */
