#!/usr/bin/env python3
"""Write the seed corpora of the file-side fuzz harnesses (FILES.md).

Usage: tools/fuzz/make_corpus.py [OUT]   (default tools/fuzz/corpus)

Small valid examples only (a few KB each), derived from the repository:
safetensors files of every dtype, config.json variants (every architecture,
rope_scaling type and quantization_config), the quant harness's byte
programs, a tokenizer.json cut down from models/localmoe-kjv plus the
pipeline components tokenizer_load.c knows, and the YAML configs of conf/
and t/data/conf/.  Deterministic: running it twice writes the same bytes.
"""

import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tools",
                                                          "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def st_file(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)] -> safetensors bytes"""
    hdr, buf = {}, b""
    if metadata is not None:
        hdr["__metadata__"] = metadata
    for name, dt, shape, raw in tensors:
        hdr[name] = {"dtype": dt, "shape": shape,
                     "data_offsets": [len(buf), len(buf) + len(raw)]}
        buf += raw
    h = json.dumps(hdr, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + buf


def safetensors():
    f32 = struct.pack("<4f", 1.0, -2.5, 0.0, 3.25)
    put("safetensors", "f32_2x2", st_file([("w", "F32", [2, 2], f32)],
                                          {"format": "pt"}))
    put("safetensors", "dtypes", st_file([
        ("a", "F16", [3], struct.pack("<3H", 0x3c00, 0x8001, 0x7c00)),
        ("b", "BF16", [1, 3], struct.pack("<3H", 0x3f80, 0xff80, 0x7fc0)),
        ("c", "F8_E4M3", [4], bytes([0x38, 0x7f, 0x80, 0x01])),
        ("d", "F8_E5M2", [2, 2], bytes([0x3c, 0x7c, 0xfc, 0x01])),
        ("e", "I32", [2], struct.pack("<2i", -1, 7)),
        ("f", "U8", [2], bytes([0, 255])),
        ("g", "I8", [2], bytes([0x80, 0x7f])),
    ]))
    put("safetensors", "scalar_empty", st_file([
        ("s", "F32", [], struct.pack("<f", 0.5)),
        ("z", "BF16", [0, 4], b""),
        ("t", "F32", [1, 1, 1, 2], struct.pack("<2f", 1, 2)),
    ]))
    put("safetensors", "no_tensors", st_file([], {"k": "v"}))
    # fuzz_safetensors.c: '{' first: an index over shards a (x, y), b (z)
    put("safetensors", "index", json.dumps({
        "metadata": {"total_size": 15},
        "weight_map": {"x": "a.safetensors", "y": "a.safetensors",
                       "z": "b.safetensors"}}))


def cfg_text(d):
    return json.dumps(d, indent=1, sort_keys=True) + "\n"


def configs():
    tiny = json.load(open(os.path.join(ROOT, "models", "localmoe-tiny",
                                       "config.json")))
    kjv = json.load(open(os.path.join(ROOT, "models", "localmoe-kjv",
                                      "config.json")))
    put("config", "tiny_mixtral", cfg_text(tiny))
    put("config", "kjv_rope_parameters", cfg_text(kjv))
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "bos_token_id": 1, "eos_token_id": [2, 3],
             "attention_bias": False, "mlp_bias": False}
    rope = {
        "llama3": {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 1024},
        "yarn": {"type": "yarn", "factor": 4.0, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                 "original_max_position_embeddings": 1024,
                 "truncate": False},
        "dynamic": {"type": "dynamic", "factor": 2.0},
        "linear": {"rope_type": "linear", "factor": 2.0},
    }
    for name, r in rope.items():
        put("config", "llama_rope_" + name,
            cfg_text(dict(llama, rope_scaling=r)))
    put("config", "mistral_window", cfg_text(dict(
        llama, architectures=["MistralForCausalLM"], sliding_window=256,
        head_dim=32)))
    put("config", "qwen2_layer_types", cfg_text(dict(
        llama, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
        sliding_window=128, max_window_layers=0,
        layer_types=["sliding_attention", "sliding_attention"])))
    put("config", "qwen2_moe", cfg_text(dict(
        llama, architectures=["Qwen2MoeForCausalLM"], num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, decoder_sparse_step=1,
        mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True)))
    put("config", "qwen3_moe", cfg_text(dict(
        llama, architectures=["Qwen3MoeForCausalLM"], num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
        norm_topk_prob=True, use_sliding_window=False)))
    put("config", "gpt2", cfg_text({
        "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
        "n_head": 4, "n_positions": 128, "vocab_size": 512, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 0, "eos_token_id": 0}))
    quant = {
        "fp8_block": {"quant_method": "fp8", "fmt": "e4m3",
                      "activation_scheme": "dynamic",
                      "weight_block_size": [32, 16],
                      "modules_to_not_convert": ["lm_head"]},
        "fp8_static": {"quant_method": "fp8", "activation_scheme": "static",
                       "ignored_layers": ["model.layers.0.mlp"]},
        "ct_fp8": {"quant_method": "compressed-tensors",
                   "format": "float-quantized",
                   "config_groups": {"group_0": {
                       "weights": {"num_bits": 8, "type": "float",
                                   "strategy": "channel"},
                       "input_activations": {"dynamic": True}}},
                   "ignore": ["lm_head", "re:.*o_proj$"]},
        "ct_fp8_block": {"quant_method": "compressed-tensors",
                         "config_groups": {"g": {"weights": {
                             "num_bits": 8, "type": "float",
                             "strategy": "block",
                             "block_structure": [128, 128]}}}},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 32,
                "version": "gemm", "zero_point": True,
                "modules_to_not_convert": None},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64,
                 "desc_act": True, "sym": False,
                 "checkpoint_format": "gptq_v2"},
    }
    for name, q in quant.items():
        put("config", "tiny_q_" + name,
            cfg_text(dict(tiny, quantization_config=q)))


def quant():
    # fuzz_quant.c's byte programs: method, flags, group, bn, bk, N, K,
    # one descriptor per tensor (weight, weight_scale, weight_scale_inv,
    # input_scale, qweight, qzeros, scales, g_idx, weight_packed,
    # weight_zero_point, weight_g_idx, weight_shape; 1: as expected), data
    pool = bytes([1, 0, 0, 0, 0, 0, 0, 0, 0x38, 0x3c, 0x11, 0x80])
    none4 = [0, 0, 0, 0]            # no compressed-tensors int4 tensors
    progs = {
        "fp8_tensor": [0, 0, 32, 0, 0, 16, 16, 1, 1, 0, 0, 0, 0, 0, 0],
        "fp8_static_e5m2": [0, 3, 32, 0, 0, 8, 24, 1, 1, 0, 1, 0, 0, 0, 0],
        "fp8_block": [0, 4, 32, 7, 15, 24, 40, 1, 0, 1, 0, 0, 0, 0, 0],
        "fp8_ignored_bf16": [0, 0, 48, 0, 0, 8, 8, 10, 0, 0, 0, 0, 0, 0, 0],
        "ct_tensor": [1, 0, 32, 0, 0, 8, 8, 1, 1, 0, 0, 0, 0, 0, 0],
        "ct_channel": [1, 8, 32, 0, 0, 16, 8, 1, 1, 0, 0, 0, 0, 0, 0],
        "ct_block_static": [1, 18, 32, 3, 3, 8, 16, 1, 1, 0, 1, 0, 0, 0,
                            0],
        "awq_g32": [2, 0, 33, 0, 0, 16, 64, 0, 0, 0, 0, 1, 1, 1, 0],
        "awq_per_column": [2, 0, 32, 0, 0, 8, 16, 0, 0, 0, 0, 1, 1, 1, 0],
        "gptq_desc_act": [3, 32, 33, 0, 0, 16, 64, 0, 0, 0, 0, 1, 1, 1, 1],
        "gptq_v2_g64": [3, 192, 34, 0, 0, 8, 128, 0, 0, 0, 0, 1, 1, 1, 0],
    }
    # compressed-tensors int4: weight_scale, weight_packed, zero points
    # (asymmetric), weight_g_idx (actorder group), weight_shape
    ct4 = {
        "ct4_g32_sym": [4, 64, 33, 0, 0, 16, 64, 0, 1, 0, 0, 0, 0, 0, 0,
                        1, 0, 0, 1],
        "ct4_g64_asym_act": [4, 32, 34, 0, 0, 16, 128, 0, 1, 0, 0, 0, 0,
                             0, 0, 1, 1, 1, 1],
        "ct4_channel_asym": [4, 0, 32, 0, 0, 8, 16, 0, 1, 0, 0, 0, 0, 0,
                             0, 1, 1, 0, 0],
    }
    for name, p in progs.items():
        put("quant", name, bytes(p + none4) + pool)
    for name, p in ct4.items():
        put("quant", name, bytes(p) + pool)


def yaml():
    # fuzz_yaml.c's directory holds the model "m" and "tpl.jinja"
    import glob
    import re
    srcs = [os.path.join(ROOT, "conf", "localmoe.yaml")]
    srcs += sorted(glob.glob(os.path.join(ROOT, "t", "data", "conf",
                                          "*.yaml")))
    for src in srcs:
        name = os.path.basename(src)
        if name.startswith("bad_") and name not in (
                "bad_dup_key.yaml", "bad_syntax.yaml",
                "bad_syntax_flow.yaml", "bad_inst_dup_gpu.yaml",
                "bad_server_key_type.yaml", "bad_chat_template.yaml"):
            continue
        text = open(src).read()
        text = re.sub(r'(model_name:\s*)("[^"]*"|[^\s#]+)', r'\1m', text)
        put("yaml", os.path.splitext(name)[0], text)
    put("yaml", "extras", "vllm:\n  model_name: m\n"
        "  chat_template: tpl.jinja\n"
        "  quantization: ~\n"
        "vllm_instances:\n"
        "  - {model_name: m, tensor_parallel_size: 2, gpu_devices: [0, 1]}\n"
        "  - model_name: ./m\n    gpu_devices: [2]\n"
        "server:\n  api_key: [k1, k2]\n  admin_api_key_file: keys.txt\n"
        "engine:\n  ring_size: 1024\n---\n")
    put("yaml", "anchors", "a: &x {model_name: m}\nvllm: *x\n"
        "engine: !!map {backend: cpu}\n")


def tok_json(d):
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def tokenizers():
    tiny = open(os.path.join(ROOT, "models", "localmoe-tiny",
                             "tokenizer.json")).read()
    tcfg = open(os.path.join(ROOT, "models", "localmoe-tiny",
                             "tokenizer_config.json")).read()
    put("tokenizer_json", "tiny_bytelevel", tiny)
    put("tokenizer_json", "tiny_with_config",
        tiny + "\n#tokenizer_config\n" + tcfg)

    # SentencePiece-style BPE with byte fallback (Llama-2 / Mistral shape)
    sp = "\u2581"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = 3 + b
    pieces = [sp, "H", "e", "l", "o", "w", "r", "d", "1", "2", "3", "!",
              ",", sp + "H", "el", "lo", sp + "w", "or", "ld", "ell",
              sp + "He", "llo", sp + "wor", sp + "Hello", sp + "world"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [sp + " H", "e l", "l o", sp + " w", "o r", "l d", "el l",
              sp + "H e", "l lo", sp + "w or", sp + "He llo",
              sp + "wor ld"]
    spm = {
        "version": "1.0",
        "added_tokens": [
            {"id": 0, "content": "<unk>", "special": True,
             "normalized": False, "single_word": False, "lstrip": False,
             "rstrip": False},
            {"id": 1, "content": "<s>", "special": True,
             "normalized": False},
            {"id": 2, "content": "</s>", "special": True,
             "normalized": False},
            {"id": len(vocab), "content": "[INST]", "special": False,
             "normalized": True, "single_word": True, "lstrip": True,
             "rstrip": True},
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": sp},
            {"type": "Replace", "pattern": {"String": " "},
             "content": sp},
            {"type": "NFC"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                       "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": sp}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    put("tokenizer_json", "sentencepiece_bpe", tok_json(spm) +
        "\n#tokenizer_config\n" + json.dumps({
            "bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "add_bos_token": True, "add_eos_token": False,
            "chat_template": [{"name": "default",
                               "template": "{{ messages }}"}]}))

    # Metaspace / Split / Digits pre-tokenizers, suffix and prefix
    vocab = {"[UNK]": 0}
    for c in "abcdefghijklmnopqrstuvwxyzHW0123456789,!" + sp:
        vocab[c] = len(vocab)
    for p in ["##e", "##l", "##o", "lo</w>", sp + "a", "He", "##llo"]:
        vocab[p] = len(vocab)
    wp = {
        "added_tokens": [],
        "normalizer": {"type": "NFKC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"},
             "behavior": "Removed", "invert": False},
            {"type": "Split", "pattern": {"String": ","},
             "behavior": "Isolated"},
            {"type": "Digits", "individual_digits": True},
            {"type": "Metaspace", "replacement": sp,
             "prepend_scheme": "first", "split": True}]},
        "post_processor": {"type": "ByteLevel"},
        "decoder": {"type": "Metaspace", "replacement": sp,
                    "prepend_scheme": "always"},
        "model": {"type": "BPE", "unk_token": "[UNK]",
                  "continuing_subword_prefix": "##",
                  "end_of_word_suffix": "</w>", "vocab": vocab,
                  "merges": [["H", "##e"], ["l", "##o"]]},
    }
    put("tokenizer_json", "split_digits_metaspace", tok_json(wp))


def main():
    safetensors()
    configs()
    quant()
    yaml()
    tokenizers()


main()
