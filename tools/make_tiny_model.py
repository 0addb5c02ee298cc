#!/usr/bin/env python3
"""Write a tiny random Hugging Face model directory (Llama, Mistral, Mixtral,
Qwen2, Qwen2-MoE, Qwen3-MoE, GPT-2).

Python 3 standard library only.  Output is deterministic for a given seed:

    config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json, model.safetensors (or model-0000N-of-0000M
    shards + model.safetensors.index.json with --shard-bytes)

The tokenizer is a real byte-level BPE tokenizer.json (GPT-2 byte alphabet,
merges learned by a small BPE trainer over Debian's license texts, special
tokens <|endoftext|>, <|im_start|>, <|im_end|>).  config vocab_size is the
tokenizer size rounded up to a multiple of 64.

Weights are random but scaled so that attention, routing and the logits
are far from uniform (projections ~ N(0, 1/fan_in), norms 1 +- 0.1).

Examples:
    tools/make_tiny_model.py --preset .     # every shipped model (repo root)
    tools/make_tiny_model.py --arch mixtral --out models/localmoe-tiny
    tools/make_tiny_model.py --arch llama --dtype f32 --out /tmp/m
"""

import argparse
import collections
import json
import math
import os
import random
import re
import struct
import sys

CORPUS_FILES = ["/usr/share/common-licenses/GPL-3",
                "/usr/share/common-licenses/Apache-2.0"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# --chat-template chatml (models/localmoe-tiny): the vocabulary has the
# ChatML tokens, so ChatML is the template that fits it
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")


# ------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, [chr(c) for c in cs]


def train_bpe(text, n_merges, byte_chars):
    """Plain BPE over pre-split words; ties broken by the pair itself."""
    # An ASCII approximation of the GPT-2 split is enough to learn merges;
    # the tokenizer applies them with the real regex.
    words = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+"
                       r"| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", text)
    freq = collections.Counter(words)
    seqs = []
    for w, c in sorted(freq.items()):
        seqs.append([[byte_chars[b] for b in w.encode("utf-8")], c])
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for syms, c in seqs:
            for i in range(len(syms) - 1):
                pairs[(syms[i], syms[i + 1])] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for item in seqs:
            syms = item[0]
            i, out = 0, []
            while i < len(syms):
                if (i + 1 < len(syms) and syms[i] == best[0]
                        and syms[i + 1] == best[1]):
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            item[0] = out
    return merges


def make_tokenizer(n_merges):
    text = []
    for p in CORPUS_FILES:
        if not os.path.exists(p):
            sys.exit("make_tiny_model: corpus file %s missing" % p)
        with open(p, encoding="utf-8") as f:
            text.append(f.read())
    bs, chars = bytes_to_unicode()
    byte_chars = [None] * 256
    for b, c in zip(bs, chars):
        byte_chars[b] = c
    vocab = collections.OrderedDict()
    for c in chars:                       # ids 0..255 in GPT-2 order
        vocab[c] = len(vocab)
    merges = train_bpe("\n".join(text), n_merges, byte_chars)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    added = []
    for s in SPECIAL:
        added.append({"id": len(vocab) + len(added), "content": s,
                      "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False,
                      "special": True})
    tok = collections.OrderedDict([
        ("version", "1.0"),
        ("truncation", None),
        ("padding", None),
        ("added_tokens", added),
        ("normalizer", None),
        ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False,
                           "trim_offsets": True, "use_regex": True}),
        ("post_processor", {"type": "ByteLevel", "add_prefix_space": True,
                            "trim_offsets": False, "use_regex": True}),
        ("decoder", {"type": "ByteLevel", "add_prefix_space": True,
                     "trim_offsets": True, "use_regex": True}),
        ("model", collections.OrderedDict([
            ("type", "BPE"), ("dropout", None), ("unk_token", None),
            ("continuing_subword_prefix", None),
            ("end_of_word_suffix", None), ("fuse_unk", False),
            ("byte_fallback", False), ("ignore_merges", False),
            ("vocab", vocab),
            ("merges", ["%s %s" % m for m in merges])])),
    ])
    return tok, len(vocab) + len(added), {a["content"]: a["id"]
                                          for a in added}


# --------------------------------------------------------------- tensors

def f32_bytes(vals):
    return struct.pack("<%df" % len(vals), *vals)


def f16_bytes(vals):
    return struct.pack("<%de" % len(vals), *vals)


def bf16_bytes(vals):
    u = struct.unpack("<%dI" % len(vals), struct.pack("<%df" % len(vals),
                                                      *vals))
    out = bytearray(2 * len(vals))
    for i, x in enumerate(u):
        if (x & 0x7fffffff) > 0x7f800000:        # nan stays nan
            h = (x >> 16) | 0x40
        else:                                     # round to nearest even
            h = (x + 0x7fff + ((x >> 16) & 1)) >> 16
        out[2 * i] = h & 0xff
        out[2 * i + 1] = (h >> 8) & 0xff
    return bytes(out)


DTYPES = {"f32": ("F32", f32_bytes, 4), "f16": ("F16", f16_bytes, 2),
          "bf16": ("BF16", bf16_bytes, 2)}


# Buffers some checkpoints carry next to the weights (GPT-2's causal mask
# attn.bias / attn.masked_bias): always float32, whatever --dtype says.
F32_BUFFERS = re.compile(r".*\.attn\.(masked_)?bias$")


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, shape, values) in the order to write."""
    header = collections.OrderedDict()
    header["__metadata__"] = {"format": "pt"}
    off = 0
    blobs = []
    for name, shape, vals in tensors:
        st_name, conv, esize = DTYPES["f32" if F32_BUFFERS.match(name)
                                      else dtype]
        n = 1
        for d in shape:
            n *= d
        assert n == len(vals), name
        header[name] = {"dtype": st_name, "shape": list(shape),
                        "data_offsets": [off, off + n * esize]}
        blobs.append(conv(vals))
        off += n * esize
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return off


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def normal(self, n, std):
        g = self.r.gauss
        return [g(0.0, std) for _ in range(n)]

    def norm_weight(self, n, spread=0.1):
        u = self.r.uniform
        return [1.0 + u(-spread, spread) for _ in range(n)]


def build_gpt2_weights(a, vocab):
    """GPT2LMHeadModel weights: Conv1D weights stored (in, out), biases,
    LayerNorms with bias, learned positions, the attn.bias causal-mask
    buffers DialoGPT's checkpoint holds; lm_head tied to wte."""
    g = Gen(a.seed)
    d, ff, P = a.dim, a.ffn, a.max_pos
    p0 = a.prefix
    w = collections.OrderedDict()
    w[p0 + "wte.weight"] = ([vocab, d], g.normal(vocab * d, 1.0))
    w[p0 + "wpe.weight"] = ([P, d], g.normal(P * d, 0.5))
    mask = [1.0 if j <= i else 0.0 for i in range(P) for j in range(P)]
    for l in range(a.layers):
        p = p0 + "h.%d." % l
        w[p + "ln_1.weight"] = ([d], g.norm_weight(d, 0.3))
        w[p + "ln_1.bias"] = ([d], g.normal(d, 0.2))
        w[p + "attn.bias"] = ([1, 1, P, P], mask)
        w[p + "attn.masked_bias"] = ([], [-1e4])
        w[p + "attn.c_attn.weight"] = ([d, 3 * d],
                                       g.normal(3 * d * d, 1.5 / math.sqrt(d)))
        w[p + "attn.c_attn.bias"] = ([3 * d], g.normal(3 * d, 0.3))
        w[p + "attn.c_proj.weight"] = ([d, d], g.normal(d * d,
                                                        1 / math.sqrt(d)))
        w[p + "attn.c_proj.bias"] = ([d], g.normal(d, 0.2))
        w[p + "ln_2.weight"] = ([d], g.norm_weight(d, 0.3))
        w[p + "ln_2.bias"] = ([d], g.normal(d, 0.2))
        w[p + "mlp.c_fc.weight"] = ([d, ff], g.normal(d * ff,
                                                      1.5 / math.sqrt(d)))
        w[p + "mlp.c_fc.bias"] = ([ff], g.normal(ff, 0.3))
        w[p + "mlp.c_proj.weight"] = ([ff, d], g.normal(ff * d,
                                                        1 / math.sqrt(ff)))
        w[p + "mlp.c_proj.bias"] = ([d], g.normal(d, 0.2))
    w[p0 + "ln_f.weight"] = ([d], g.norm_weight(d, 0.3))
    w[p0 + "ln_f.bias"] = ([d], g.normal(d, 0.2))
    return w


def swiglu(w, g, pre, ff, d):
    w[pre + "gate_proj.weight"] = ([ff, d], g.normal(ff * d, 1 / math.sqrt(d)))
    w[pre + "up_proj.weight"] = ([ff, d], g.normal(ff * d, 1 / math.sqrt(d)))
    w[pre + "down_proj.weight"] = ([d, ff], g.normal(d * ff,
                                                     1 / math.sqrt(ff)))


def build_weights(a, vocab):
    """Logical weights: dict name -> (shape, values), HF per-expert names."""
    if a.arch == "gpt2":
        return build_gpt2_weights(a, vocab)
    g = Gen(a.seed)
    d, ff, hd = a.dim, a.ffn, a.head_dim
    q, kv = a.heads * hd, a.kv_heads * hd
    w = collections.OrderedDict()
    w["model.embed_tokens.weight"] = ([vocab, d], g.normal(vocab * d, 1.0))
    for l in range(a.layers):
        p = "model.layers.%d." % l
        w[p + "input_layernorm.weight"] = ([d], g.norm_weight(d))
        w[p + "self_attn.q_proj.weight"] = ([q, d],
                                            g.normal(q * d, 1.5 / math.sqrt(d)))
        w[p + "self_attn.k_proj.weight"] = ([kv, d],
                                            g.normal(kv * d,
                                                     1.5 / math.sqrt(d)))
        w[p + "self_attn.v_proj.weight"] = ([kv, d],
                                            g.normal(kv * d, 1 / math.sqrt(d)))
        w[p + "self_attn.o_proj.weight"] = ([d, q],
                                            g.normal(d * q, 1 / math.sqrt(q)))
        if a.arch == "llama" and a.bias:
            w[p + "self_attn.q_proj.bias"] = ([q], g.normal(q, 0.5))
            w[p + "self_attn.k_proj.bias"] = ([kv], g.normal(kv, 0.5))
            w[p + "self_attn.v_proj.bias"] = ([kv], g.normal(kv, 0.3))
            w[p + "self_attn.o_proj.bias"] = ([d], g.normal(d, 0.3))
        if a.arch in ("qwen2", "qwen2moe"):
            w[p + "self_attn.q_proj.bias"] = ([q], g.normal(q, 0.5))
            w[p + "self_attn.k_proj.bias"] = ([kv], g.normal(kv, 0.5))
            w[p + "self_attn.v_proj.bias"] = ([kv], g.normal(kv, 0.3))
        if a.arch == "qwen3moe":
            w[p + "self_attn.q_norm.weight"] = ([hd], g.norm_weight(hd, 0.5))
            w[p + "self_attn.k_norm.weight"] = ([hd], g.norm_weight(hd, 0.5))
        w[p + "post_attention_layernorm.weight"] = ([d], g.norm_weight(d))
        if a.arch in ("qwen2moe", "qwen3moe") and moe_layer(a, l):
            w[p + "mlp.gate.weight"] = (
                [a.experts, d], g.normal(a.experts * d, 2 / math.sqrt(d)))
            for e in range(a.experts):
                swiglu(w, g, p + "mlp.experts.%d." % e, a.moe_ffn, d)
            if a.arch == "qwen2moe":
                swiglu(w, g, p + "mlp.shared_expert.", a.shared_ffn, d)
                w[p + "mlp.shared_expert_gate.weight"] = (
                    [1, d], g.normal(d, 2 / math.sqrt(d)))
        elif a.arch in ("qwen2moe", "qwen3moe"):
            swiglu(w, g, p + "mlp.", ff, d)
        elif a.arch == "mixtral":
            w[p + "block_sparse_moe.gate.weight"] = (
                [a.experts, d], g.normal(a.experts * d, 2 / math.sqrt(d)))
            for e in range(a.experts):
                pe = p + "block_sparse_moe.experts.%d." % e
                w[pe + "w1.weight"] = ([ff, d],
                                       g.normal(ff * d, 1 / math.sqrt(d)))
                w[pe + "w2.weight"] = ([d, ff],
                                       g.normal(d * ff, 1 / math.sqrt(ff)))
                w[pe + "w3.weight"] = ([ff, d],
                                       g.normal(ff * d, 1 / math.sqrt(d)))
        else:
            w[p + "mlp.gate_proj.weight"] = ([ff, d],
                                             g.normal(ff * d,
                                                      1 / math.sqrt(d)))
            w[p + "mlp.up_proj.weight"] = ([ff, d],
                                           g.normal(ff * d, 1 / math.sqrt(d)))
            w[p + "mlp.down_proj.weight"] = ([d, ff],
                                             g.normal(d * ff,
                                                      1 / math.sqrt(ff)))
            if a.arch == "llama" and a.bias:
                w[p + "mlp.gate_proj.bias"] = ([ff], g.normal(ff, 0.5))
                w[p + "mlp.up_proj.bias"] = ([ff], g.normal(ff, 0.5))
                w[p + "mlp.down_proj.bias"] = ([d], g.normal(d, 0.3))
    w["model.norm.weight"] = ([d], g.norm_weight(d))
    if not a.tie:
        w["lm_head.weight"] = ([vocab, d], g.normal(vocab * d,
                                                    2 / math.sqrt(d)))
    return w


def moe_layer(a, l):
    """Qwen MoE: does layer l use the sparse block (as transformers
    decides from mlp_only_layers and decoder_sparse_step)?"""
    return l not in a.mlp_only and (l + 1) % a.sparse_step == 0


def fuse_experts(w, a):
    """Rewrite per-expert Mixtral weights into transformers 5's fused
    layout: mlp.gate.weight, mlp.experts.gate_up_proj (E, 2*ffn, dim) with
    gate rows first, mlp.experts.down_proj (E, dim, ffn)."""
    out = collections.OrderedDict()
    for name, val in w.items():
        mq = re.match(r"(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(.*)",
                      name)
        if mq:
            p, e, rest = mq.groups()
            if e == "0" and rest == "gate_proj.weight":
                gu, dn = [], []
                for e in range(a.experts):
                    pe = p + "mlp.experts.%d." % e
                    gu += (w[pe + "gate_proj.weight"][1]
                           + w[pe + "up_proj.weight"][1])
                    dn += w[pe + "down_proj.weight"][1]
                out[p + "mlp.experts.gate_up_proj"] = (
                    [a.experts, 2 * a.moe_ffn, a.dim], gu)
                out[p + "mlp.experts.down_proj"] = (
                    [a.experts, a.dim, a.moe_ffn], dn)
            continue
        m = re.match(r"(model\.layers\.\d+\.)block_sparse_moe\.(.*)", name)
        if not m:
            out[name] = val
            continue
        p, rest = m.groups()
        if rest == "gate.weight":
            out[p + "mlp.gate.weight"] = val
        elif rest == "experts.0.w1.weight":
            gu, dn = [], []
            for e in range(a.experts):
                pe = p + "block_sparse_moe.experts.%d." % e
                gu += w[pe + "w1.weight"][1] + w[pe + "w3.weight"][1]
                dn += w[pe + "w2.weight"][1]
            out[p + "mlp.experts.gate_up_proj"] = (
                [a.experts, 2 * a.ffn, a.dim], gu)
            out[p + "mlp.experts.down_proj"] = ([a.experts, a.dim, a.ffn], dn)
    return out


# ------------------------------------------------------------------ main

# The models the project ships: the default served model and the test
# models the forward/reference tests use (--preset all writes them all,
# relative to the repository root).
PRESETS = collections.OrderedDict([
    ("models/localmoe-tiny",
     "--arch mixtral --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 "
     "--experts 8 --top-k 2 --dtype bf16 --expert-layout per-expert "
     "--seed 1"),
    ("t/data/models/llama-mha",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 4 --ffn 128 "
     "--dtype f32 --seed 2"),
    ("t/data/models/llama-gqa",
     "--arch llama --dim 64 --layers 2 --heads 8 --kv-heads 2 --ffn 128 "
     "--dtype bf16 --tie --seed 3"),
    ("t/data/models/mixtral-gqa",
     "--arch mixtral --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 64 "
     "--experts 4 --top-k 2 --dtype bf16 --expert-layout per-expert "
     "--shard-bytes 200000 --seed 4"),
    ("t/data/models/mixtral-fused",
     "--arch mixtral --dim 64 --layers 2 --heads 4 --kv-heads 4 --ffn 64 "
     "--experts 6 --top-k 3 --dtype f16 --expert-layout fused --seed 5"),
    ("t/data/models/mistral-sw",
     "--arch mistral --dim 64 --layers 2 --heads 4 --kv-heads 2 "
     "--head-dim 32 --ffn 128 --sliding-window 8 --dtype bf16 --seed 6"),
    ("t/data/models/llama-bias",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 "
     "--bias --dtype bf16 --seed 11"),
    ("t/data/models/qwen2-bias",
     "--arch qwen2 --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 "
     "--dtype f32 --tie --seed 7"),
    ("t/data/models/qwen2moe-shared",
     "--arch qwen2moe --dim 64 --layers 3 --heads 4 --kv-heads 2 --ffn 96 "
     "--moe-ffn 32 --shared-ffn 64 --experts 4 --top-k 2 --mlp-only 1 "
     "--dtype bf16 --seed 8"),
    ("t/data/models/qwen3moe-qknorm",
     "--arch qwen3moe --dim 64 --layers 2 --heads 4 --kv-heads 2 "
     "--head-dim 32 --ffn 96 --moe-ffn 32 --experts 6 --top-k 3 "
     "--norm-topk --expert-layout fused --dtype bf16 --seed 9"),
    # RoPE scaling: the llama-gqa shape (head_dim 16: 8 frequencies from
    # wavelength 6 to 20000, so each scheme's regions are all hit)
    ("t/data/models/llama-rope-linear",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 64 "
     "--dtype bf16 --seed 12 "
     "--rope-scaling {\"rope_type\":\"linear\",\"factor\":2.5}"),
    ("t/data/models/llama-rope-llama3",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 64 "
     "--dtype bf16 --seed 13 --rope-scaling {\"rope_type\":\"llama3\","
     "\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
     "\"original_max_position_embeddings\":64}"),
    ("t/data/models/llama-rope-yarn",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 64 "
     "--dtype bf16 --seed 14 --max-pos 1024 --rope-scaling "
     "{\"rope_type\":\"yarn\",\"factor\":4.0,"
     "\"original_max_position_embeddings\":256}"),
    ("t/data/models/llama-rope-dynamic",
     "--arch llama --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 64 "
     "--dtype bf16 --seed 15 --max-pos 24 "
     "--rope-scaling {\"rope_type\":\"dynamic\",\"factor\":2.0}"),
    ("t/data/models/gpt2-tiny",
     "--arch gpt2 --dim 64 --layers 2 --heads 4 --ffn 256 --max-pos 128 "
     "--dtype f32 --seed 10"),
])


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--preset":
        root = sys.argv[2]
        for out, args in PRESETS.items():
            build(args.split() + ["--out", os.path.join(root, out)])
            print("wrote", os.path.join(root, out))
        return
    build(sys.argv[1:])


_TOK_CACHE = {}
NEW_ARCHS = ("qwen2", "qwen2moe", "qwen3moe", "gpt2")


def new_config(a, arch_name, vocab, eos):
    """config.json for Qwen2 / Qwen2-MoE / Qwen3-MoE / GPT-2, field names
    as transformers' configuration_<arch>.py spells them."""
    dt = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype]
    if a.arch == "gpt2":
        return collections.OrderedDict([
            ("architectures", [arch_name]),
            ("model_type", "gpt2"),
            ("activation_function", a.activation),
            ("attn_pdrop", 0.0),
            ("embd_pdrop", 0.0),
            ("resid_pdrop", 0.0),
            ("bos_token_id", eos),
            ("eos_token_id", eos),
            ("initializer_range", 0.02),
            ("layer_norm_epsilon", 1e-5),
            ("n_ctx", a.max_pos),
            ("n_embd", a.dim),
            ("n_head", a.heads),
            ("n_inner", a.ffn),
            ("n_layer", a.layers),
            ("n_positions", a.max_pos),
            ("reorder_and_upcast_attn", False),
            ("scale_attn_by_inverse_layer_idx", False),
            ("scale_attn_weights", True),
            ("tie_word_embeddings", True),
            ("use_cache", True),
            ("vocab_size", vocab),
            ("torch_dtype", dt),
        ])
    cfg = collections.OrderedDict([
        ("architectures", [arch_name]),
        ("model_type", {"qwen2": "qwen2", "qwen2moe": "qwen2_moe",
                        "qwen3moe": "qwen3_moe"}[a.arch]),
        ("hidden_size", a.dim),
        ("intermediate_size", a.ffn),
        ("num_hidden_layers", a.layers),
        ("num_attention_heads", a.heads),
        ("num_key_value_heads", a.kv_heads),
        ("hidden_act", "silu"),
        ("max_position_embeddings", a.max_pos),
        ("rms_norm_eps", 1e-6),
        ("tie_word_embeddings", bool(a.tie)),
        ("vocab_size", vocab),
        ("bos_token_id", eos),
        ("eos_token_id", eos),
        ("attention_dropout", 0.0),
        ("initializer_range", 0.02),
        ("use_cache", True),
        # present but off, as in the published Qwen configs
        ("use_sliding_window", False),
        ("sliding_window", 4096),
        ("max_window_layers", 28),
        ("torch_dtype", dt),
    ])
    if a.arch == "qwen3moe":
        cfg["head_dim"] = a.head_dim
        cfg["attention_bias"] = False
        cfg["rope_parameters"] = {"rope_type": "default",
                                  "rope_theta": 1000000.0}
    else:
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = None
    if a.arch in ("qwen2moe", "qwen3moe"):
        cfg["num_experts"] = a.experts
        cfg["num_experts_per_tok"] = a.top_k
        cfg["moe_intermediate_size"] = a.moe_ffn
        cfg["norm_topk_prob"] = bool(a.norm_topk)
        cfg["decoder_sparse_step"] = a.sparse_step
        cfg["mlp_only_layers"] = a.mlp_only
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.001
    if a.arch == "qwen2moe":
        cfg["shared_expert_intermediate_size"] = a.shared_ffn
        cfg["qkv_bias"] = True
    return cfg


def build(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["llama", "mistral", "mixtral",
                                       "qwen2", "qwen2moe", "qwen3moe",
                                       "gpt2"],
                    default="mixtral")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None,
                    help="written to config.json when given")
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--expert-layout", choices=["per-expert", "fused"],
                    default="per-expert")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--sliding-window", type=int, default=None)
    ap.add_argument("--max-pos", type=int, default=2048)
    ap.add_argument("--rope-scaling", type=str, default=None,
                    help="config.json rope_scaling, as JSON")
    ap.add_argument("--merges", type=int, default=250)
    ap.add_argument("--shard-bytes", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--moe-ffn", type=int, default=32,
                    help="Qwen MoE moe_intermediate_size")
    ap.add_argument("--shared-ffn", type=int, default=64,
                    help="Qwen2-MoE shared_expert_intermediate_size")
    ap.add_argument("--mlp-only", type=str, default="",
                    help="Qwen MoE mlp_only_layers, comma separated")
    ap.add_argument("--sparse-step", type=int, default=1,
                    help="Qwen MoE decoder_sparse_step")
    ap.add_argument("--norm-topk", action="store_true",
                    help="Qwen MoE norm_topk_prob true")
    ap.add_argument("--bias", action="store_true",
                    help="Llama attention_bias and mlp_bias true")
    ap.add_argument("--activation", default="gelu_new",
                    help="GPT-2 activation_function")
    ap.add_argument("--no-prefix", action="store_true",
                    help="GPT-2 tensor names without 'transformer.'")
    ap.add_argument("--chat-template", choices=("none", "chatml"),
                    default="none",
                    help="chat_template in tokenizer_config.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.heads % a.kv_heads:
        sys.exit("--heads must be a multiple of --kv-heads")
    a.head_dim = a.head_dim or a.dim // a.heads
    a.mlp_only = [int(x) for x in a.mlp_only.split(",") if x != ""]
    a.prefix = "" if a.no_prefix else "transformer."
    if a.arch in ("mixtral", "qwen2moe", "qwen3moe") and a.top_k > a.experts:
        sys.exit("--top-k larger than --experts")

    if a.merges not in _TOK_CACHE:
        _TOK_CACHE[a.merges] = make_tokenizer(a.merges)
    tok, n_tok, special = _TOK_CACHE[a.merges]
    vocab = (n_tok + 63) // 64 * 64
    eos, im_end = special["<|endoftext|>"], special["<|im_end|>"]

    os.makedirs(a.out, exist_ok=True)
    arch_name = {"llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM",
                 "qwen2moe": "Qwen2MoeForCausalLM",
                 "qwen3moe": "Qwen3MoeForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}[a.arch]
    cfg = collections.OrderedDict([
        ("architectures", [arch_name]),
        ("model_type", a.arch),
        ("hidden_size", a.dim),
        ("intermediate_size", a.ffn),
        ("num_hidden_layers", a.layers),
        ("num_attention_heads", a.heads),
        ("num_key_value_heads", a.kv_heads),
        ("hidden_act", "silu"),
        ("max_position_embeddings", a.max_pos),
        ("rms_norm_eps", 1e-5),
        ("rope_theta", 1e6 if a.arch == "mixtral" else 10000.0),
        ("rope_scaling", json.loads(a.rope_scaling) if a.rope_scaling
                         else None),
        ("tie_word_embeddings", bool(a.tie)),
        ("vocab_size", vocab),
        ("bos_token_id", eos),
        ("eos_token_id", eos),
        ("attention_dropout", 0.0),
        ("initializer_range", 0.02),
        ("use_cache", True),
        ("torch_dtype", {"f32": "float32", "f16": "float16",
                         "bf16": "bfloat16"}[a.dtype]),
    ])
    if a.head_dim != a.dim // a.heads or a.arch == "mistral":
        cfg["head_dim"] = a.head_dim
    if a.arch == "llama":
        cfg["attention_bias"] = bool(a.bias)
        cfg["mlp_bias"] = bool(a.bias)
        cfg["pretraining_tp"] = 1
    else:
        cfg["sliding_window"] = a.sliding_window
    if a.arch == "mixtral":
        cfg["num_local_experts"] = a.experts
        cfg["num_experts_per_tok"] = a.top_k
        cfg["router_aux_loss_coef"] = 0.02
        cfg["output_router_logits"] = False
        cfg["router_jitter_noise"] = 0.0
    if a.arch in NEW_ARCHS:
        cfg = new_config(a, arch_name, vocab, eos)

    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": eos, "eos_token_id": [eos, im_end]}, f,
                  indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "tokenizer.json"), "w",
              encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    tcfg = collections.OrderedDict([
        ("add_bos_token", False),
        ("add_eos_token", False),
        ("added_tokens_decoder", {
            str(special[s]): {"content": s, "lstrip": False,
                              "normalized": False, "rstrip": False,
                              "single_word": False, "special": True}
            for s in SPECIAL}),
        ("bos_token", "<|endoftext|>"),
        ("eos_token", "<|endoftext|>"),
        ("clean_up_tokenization_spaces", False),
        ("model_max_length", a.max_pos),
        ("tokenizer_class", "PreTrainedTokenizerFast"),
    ])
    if a.chat_template == "chatml":
        tcfg["chat_template"] = CHATML_TEMPLATE
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
        f.write("\n")

    w = build_weights(a, vocab)
    if (a.arch in ("mixtral", "qwen2moe", "qwen3moe")
            and a.expert_layout == "fused"):
        w = fuse_experts(w, a)
    items = [(n, s, v) for n, (s, v) in w.items()]

    for old in os.listdir(a.out):
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.unlink(os.path.join(a.out, old))
    esize = DTYPES[a.dtype][2]
    if a.shard_bytes <= 0:
        write_safetensors(os.path.join(a.out, "model.safetensors"), items,
                          a.dtype)
        return
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        nb = len(it[2]) * esize
        if cur and cur_bytes + nb > a.shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    wmap, total = collections.OrderedDict(), 0
    for i, sh in enumerate(shards):
        fn = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        total += write_safetensors(os.path.join(a.out, fn), sh, a.dtype)
        for n, _, _ in sh:
            wmap[n] = fn
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f,
                  indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
