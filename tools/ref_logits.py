#!/usr/bin/env python3
"""Reference logits for the test models, from Hugging Face transformers.

Runs on a machine with torch + transformers (CPU is enough: the models are
tiny).  For each model directory it loads AutoModelForCausalLM in float32
with eager attention, feeds a fixed pseudo-random token sequence and writes

    <out>/<model>.logits.bin   float32 little-endian, (n_pos, vocab) logits
                               of every position
    <out>/<model>.json         {"model", "tokens", "n_pos", "vocab",
                                "greedy": 20 ids (argmax, no EOS stop),
                                "greedy_generate": model.generate ids,
                                versions} or {"error": why} when
                               transformers cannot load the layout

t/unit/forward.c compares the CPU backend with these files.

Usage (from the repository root):
    python3 tools/ref_logits.py                      # every t/data/models/*
    python3 tools/ref_logits.py t/data/models/llama-mha --out t/data/ref
"""

import argparse
import glob
import json
import os
import random
import re
import sys


def dynamic_rope(model_dir):
    """True when config.json asks for dynamic NTK RoPE scaling."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    for k in ("rope_scaling", "rope_parameters"):
        v = cfg.get(k) or {}
        if (v.get("rope_type") or v.get("type")) == "dynamic":
            return True
    return False


def load(model_dir, torch, AutoModelForCausalLM):
    kw = dict(attn_implementation="eager", output_loading_info=True)
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir,
                                                    dtype=torch.float32,
                                                    **kw)
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(model_dir,
                                                    torch_dtype=torch.float32,
                                                    **kw)


# ----------------------------------------------------------------------
# --backend python: an independent float64 re-implementation of the HF
# Llama/Mistral/Mixtral/Qwen2/Qwen2-MoE/Qwen3-MoE/GPT-2 forward in plain
# Python (no torch), for checking
# the C engine where transformers is not installed.  Not a substitute for
# the transformers references: it encodes our reading of HF's math.

def _st_read(path):
    import struct
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[base + b:base + e]
        cnt = 1
        for d in t["shape"]:
            cnt *= d
        if t["dtype"] == "F32":
            vals = list(struct.unpack("<%df" % cnt, raw))
        elif t["dtype"] == "F16":
            vals = list(struct.unpack("<%de" % cnt, raw))
        elif t["dtype"] == "BF16":
            u = struct.unpack("<%dH" % cnt, raw)
            vals = list(struct.unpack("<%df" % cnt, struct.pack(
                "<%dI" % cnt, *[x << 16 for x in u])))
        else:
            raise ValueError("dtype " + t["dtype"])
        out[name] = (t["shape"], vals)
    return out


def _py_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    idx = os.path.join(d, "model.safetensors.index.json")
    W = {}
    if os.path.exists(idx):
        for fn in sorted(set(json.load(open(idx))["weight_map"].values())):
            W.update(_st_read(os.path.join(d, fn)))
    else:
        W.update(_st_read(os.path.join(d, "model.safetensors")))
    return cfg, W


def _rows(t):
    shape, v = t
    n = shape[-1]
    return [v[i:i + n] for i in range(0, len(v), n)]


def _mv(rows, x):
    return [sum(a * b for a, b in zip(r, x)) for r in rows]


def _rms(x, w, eps):
    import math
    inv = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [wi * (xi * inv) for xi, wi in zip(x, w)]


def _ln(x, w, b, eps):
    import math
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    inv = 1.0 / math.sqrt(var + eps)
    return [(xi - mu) * inv * wi + bi for xi, wi, bi in zip(x, w, b)]


def _add(a, b):
    return [x + y for x, y in zip(a, b)]


def _cols(t, c0, n):
    """Conv1D weight (in, out): rows of the transposed columns c0..c0+n."""
    shape, v = t
    out = shape[1]
    return [[v[i * out + c] for i in range(shape[0])]
            for c in range(c0, c0 + n)]


class PyGPT2:
    """GPT2LMHeadModel: LayerNorm with bias, learned positions, Conv1D
    projections, gelu_new MLP, tied lm_head."""

    def __init__(self, d):
        import math
        cfg, W = _py_model(d)
        self._math = math
        pre = "transformer." if "transformer.wte.weight" in W else ""
        self.D = cfg["n_embd"]
        self.H = cfg["n_head"]
        self.hd = self.D // self.H
        self.L = cfg["n_layer"]
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.act = cfg.get("activation_function", "gelu_new")
        self.emb = _rows(W[pre + "wte.weight"])
        self.pos = _rows(W[pre + "wpe.weight"])
        self.head = self.emb
        self.lnf = (W[pre + "ln_f.weight"][1], W[pre + "ln_f.bias"][1])
        D = self.D
        self.layers = []
        for l in range(self.L):
            p = pre + "h.%d." % l
            ca = W[p + "attn.c_attn.weight"]
            cb = W[p + "attn.c_attn.bias"][1]
            fc = W[p + "mlp.c_fc.weight"]
            self.layers.append({
                "ln1": (W[p + "ln_1.weight"][1], W[p + "ln_1.bias"][1]),
                "ln2": (W[p + "ln_2.weight"][1], W[p + "ln_2.bias"][1]),
                "q": _cols(ca, 0, D), "k": _cols(ca, D, D),
                "v": _cols(ca, 2 * D, D),
                "bq": cb[:D], "bk": cb[D:2 * D], "bv": cb[2 * D:],
                "o": _cols(W[p + "attn.c_proj.weight"], 0, D),
                "bo": W[p + "attn.c_proj.bias"][1],
                "fc": _cols(fc, 0, fc[0][1]), "bfc": W[p + "mlp.c_fc.bias"][1],
                "pr": _cols(W[p + "mlp.c_proj.weight"], 0, D),
                "bpr": W[p + "mlp.c_proj.bias"][1]})

    def _gelu(self, x):
        m = self._math
        if self.act == "gelu":
            return 0.5 * x * (1.0 + m.erf(x / m.sqrt(2.0)))
        return 0.5 * x * (1.0 + m.tanh(m.sqrt(2.0 / m.pi)
                                       * (x + 0.044715 * x ** 3)))

    def step(self, cache, tok, pos):
        m = self._math
        hd = self.hd
        x = _add(self.emb[tok], self.pos[pos])
        for l, ly in enumerate(self.layers):
            xb = _ln(x, ly["ln1"][0], ly["ln1"][1], self.eps)
            q = _add(_mv(ly["q"], xb), ly["bq"])
            k = _add(_mv(ly["k"], xb), ly["bk"])
            v = _add(_mv(ly["v"], xb), ly["bv"])
            cache[l][0].append(k)
            cache[l][1].append(v)
            att = []
            for h in range(self.H):
                qh = q[h * hd:(h + 1) * hd]
                sc = [sum(a * b for a, b in
                          zip(qh, cache[l][0][j][h * hd:(h + 1) * hd]))
                      / m.sqrt(hd) for j in range(pos + 1)]
                mx = max(sc)
                ex = [m.exp(s - mx) for s in sc]
                z = sum(ex)
                o = [0.0] * hd
                for j, e in enumerate(ex):
                    vv = cache[l][1][j][h * hd:(h + 1) * hd]
                    for i in range(hd):
                        o[i] += e / z * vv[i]
                att += o
            x = _add(x, _add(_mv(ly["o"], att), ly["bo"]))
            xb = _ln(x, ly["ln2"][0], ly["ln2"][1], self.eps)
            h1 = [self._gelu(a) for a in _add(_mv(ly["fc"], xb), ly["bfc"])]
            x = _add(x, _add(_mv(ly["pr"], h1), ly["bpr"]))
        return _mv(self.head, _ln(x, self.lnf[0], self.lnf[1], self.eps))


class PyModel:
    def __init__(self, d):
        import math
        cfg, W = _py_model(d)
        self.cfg = cfg
        self.D = cfg["hidden_size"]
        self.H = cfg["num_attention_heads"]
        self.KV = cfg.get("num_key_value_heads") or self.H
        self.hd = cfg.get("head_dim") or self.D // self.H
        self.L = cfg["num_hidden_layers"]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        arch = cfg["architectures"][0]
        self.qwen_moe = arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
        self.moe = arch == "MixtralForCausalLM" or self.qwen_moe
        theta = cfg.get("rope_theta",
                        (cfg.get("rope_parameters") or {}).get(
                            "rope_theta",
                            1e6 if arch == "MixtralForCausalLM" else 1e4))
        self.win = (cfg.get("sliding_window") or 0) \
            if arch in ("MistralForCausalLM", "MixtralForCausalLM") else 0
        self.renorm = (cfg.get("norm_topk_prob", False) if self.qwen_moe
                       else True)
        self.inv = [1.0 / theta ** (2 * i / self.hd)
                    for i in range(self.hd // 2)]
        self.emb = _rows(W["model.embed_tokens.weight"])
        self.head = (self.emb if cfg.get("tie_word_embeddings")
                     else _rows(W["lm_head.weight"]))
        self.norm = W["model.norm.weight"][1]
        self.layers = []
        F = cfg["intermediate_size"]
        for l in range(self.L):
            p = "model.layers.%d." % l
            ly = {"an": W[p + "input_layernorm.weight"][1],
                  "fn": W[p + "post_attention_layernorm.weight"][1]}
            for k in "qkvo":
                ly[k] = _rows(W[p + "self_attn.%s_proj.weight" % k])
                bn = p + "self_attn.%s_proj.bias" % k
                ly["b" + k] = W[bn][1] if bn in W else None
            if p + "self_attn.q_norm.weight" in W:
                ly["qn"] = W[p + "self_attn.q_norm.weight"][1]
                ly["kn"] = W[p + "self_attn.k_norm.weight"][1]
            dense = False
            if self.qwen_moe:
                step = cfg.get("decoder_sparse_step", 1)
                dense = (l in (cfg.get("mlp_only_layers") or [])
                         or (l + 1) % step != 0)
                F = cfg["moe_intermediate_size"]
            ly["dense"] = dense
            if p + "mlp.shared_expert_gate.weight" in W and not dense:
                ly["sh"] = (_rows(W[p + "mlp.shared_expert.gate_proj.weight"]),
                            _rows(W[p + "mlp.shared_expert.up_proj.weight"]),
                            _rows(W[p + "mlp.shared_expert.down_proj.weight"]))
                ly["shg"] = W[p + "mlp.shared_expert_gate.weight"][1]
            if self.moe and not dense:
                E = cfg.get("num_local_experts") or cfg.get("num_experts")
                ly["topk"] = cfg.get("num_experts_per_tok", 2)
                if p + "mlp.experts.gate_up_proj" in W:
                    ly["router"] = _rows(W[p + "mlp.gate.weight"])
                    gu = _rows(W[p + "mlp.experts.gate_up_proj"])
                    dn = _rows(W[p + "mlp.experts.down_proj"])
                    D = self.D
                    ly["ex"] = [(gu[e * 2 * F:e * 2 * F + F],
                                 gu[e * 2 * F + F:(e + 1) * 2 * F],
                                 dn[e * D:(e + 1) * D]) for e in range(E)]
                elif p + "mlp.experts.0.gate_proj.weight" in W:
                    ly["router"] = _rows(W[p + "mlp.gate.weight"])
                    q = p + "mlp.experts.%d.%s_proj.weight"
                    ly["ex"] = [(_rows(W[q % (e, "gate")]),
                                 _rows(W[q % (e, "up")]),
                                 _rows(W[q % (e, "down")])) for e in range(E)]
                else:
                    ly["router"] = _rows(W[p + "block_sparse_moe.gate.weight"])
                    q = p + "block_sparse_moe.experts.%d.%s.weight"
                    ly["ex"] = [(_rows(W[q % (e, "w1")]),
                                 _rows(W[q % (e, "w3")]),
                                 _rows(W[q % (e, "w2")])) for e in range(E)]
            else:
                ly["ex"] = [(_rows(W[p + "mlp.gate_proj.weight"]),
                             _rows(W[p + "mlp.up_proj.weight"]),
                             _rows(W[p + "mlp.down_proj.weight"]))
                            + tuple(W[p + "mlp.%s_proj.bias" % n][1]
                                    if p + "mlp.%s_proj.bias" % n in W
                                    else None
                                    for n in ("gate", "up", "down"))]
            self.layers.append(ly)
        self._math = math

    def _rope(self, v, pos):
        m = self._math
        h = self.hd // 2
        out = list(v)
        for i in range(h):
            c, s = m.cos(pos * self.inv[i]), m.sin(pos * self.inv[i])
            out[i] = v[i] * c - v[i + h] * s
            out[i + h] = v[i + h] * c + v[i] * s
        return out

    def _expert(self, ex, x):
        g, u, dn = ex[:3]
        bg, bu, bd = (tuple(ex[3:]) + (None, None, None))[:3]
        gv, uv = _mv(g, x), _mv(u, x)
        if bg is not None:
            gv, uv = _add(gv, bg), _add(uv, bu)
        h = [a / (1.0 + self._math.exp(-a)) * b for a, b in zip(gv, uv)]
        y = _mv(dn, h)
        return _add(y, bd) if bd is not None else y

    def step(self, cache, tok, pos):
        """Process one token at pos with cache [(K, V) per layer]."""
        m = self._math
        x = list(self.emb[tok])
        hd, grp = self.hd, self.H // self.KV
        for l, ly in enumerate(self.layers):
            xb = _rms(x, ly["an"], self.eps)
            q, k, v = _mv(ly["q"], xb), _mv(ly["k"], xb), _mv(ly["v"], xb)
            if ly["bq"] is not None:
                q, k, v = _add(q, ly["bq"]), _add(k, ly["bk"]), \
                    _add(v, ly["bv"])
            if "qn" in ly:
                q = sum((_rms(q[h * hd:(h + 1) * hd], ly["qn"], self.eps)
                         for h in range(self.H)), [])
                k = sum((_rms(k[h * hd:(h + 1) * hd], ly["kn"], self.eps)
                         for h in range(self.KV)), [])
            q = sum((self._rope(q[h * hd:(h + 1) * hd], pos)
                     for h in range(self.H)), [])
            k = sum((self._rope(k[h * hd:(h + 1) * hd], pos)
                     for h in range(self.KV)), [])
            cache[l][0].append(k)
            cache[l][1].append(v)
            lo = max(0, pos - self.win + 1) if self.win else 0
            att = []
            for h in range(self.H):
                kh = h // grp
                qh = q[h * hd:(h + 1) * hd]
                sc = [sum(a * b for a, b in
                          zip(qh, cache[l][0][j][kh * hd:(kh + 1) * hd]))
                      / m.sqrt(hd) for j in range(lo, pos + 1)]
                mx = max(sc)
                ex = [m.exp(s - mx) for s in sc]
                z = sum(ex)
                o = [0.0] * hd
                for j, e in zip(range(lo, pos + 1), ex):
                    vv = cache[l][1][j][kh * hd:(kh + 1) * hd]
                    for i in range(hd):
                        o[i] += e / z * vv[i]
                att += o
            ao = _mv(ly["o"], att)
            if ly["bo"] is not None:
                ao = _add(ao, ly["bo"])
            x = [a + b for a, b in zip(x, ao)]
            xb = _rms(x, ly["fn"], self.eps)
            if self.moe and not ly["dense"]:
                lg = _mv(ly["router"], xb)
                mx = max(lg)
                pr = [m.exp(a - mx) for a in lg]
                z = sum(pr)
                pr = [a / z for a in pr]
                top = sorted(range(len(pr)), key=lambda e: (-pr[e], e))
                top = sorted(top[:ly["topk"]])
                z = sum(pr[e] for e in top) if self.renorm else 1.0
                y = [0.0] * self.D
                for e in top:
                    ye = self._expert(ly["ex"][e], xb)
                    y = [a + pr[e] / z * b for a, b in zip(y, ye)]
                if "sh" in ly:
                    gs = sum(a * b for a, b in zip(ly["shg"], xb))
                    sg = 1.0 / (1.0 + m.exp(-gs))
                    ys = self._expert(ly["sh"], xb)
                    y = [a + sg * b for a, b in zip(y, ys)]
            else:
                y = self._expert(ly["ex"][0], xb)
            x = [a + b for a, b in zip(x, y)]
        return _mv(self.head, _rms(x, self.norm, self.eps))


def python_refs(a, models):
    import struct
    os.makedirs(a.out, exist_ok=True)
    for d in models:
        name = os.path.basename(os.path.normpath(d))
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            n_real = len(json.load(f)["model"]["vocab"])
        rng = random.Random(a.seed)
        tokens = [rng.randrange(n_real) for _ in range(a.n_pos)]
        cfg = json.load(open(os.path.join(d, "config.json")))
        pm = (PyGPT2(d) if cfg["architectures"][0] == "GPT2LMHeadModel"
              else PyModel(d))
        cache = [([], []) for _ in range(pm.L)]
        rows = []
        for p, t in enumerate(tokens):
            rows.append(pm.step(cache, t, p))
        greedy = []
        lg = rows[-1]
        for i in range(a.n_greedy):
            t = max(range(len(lg)), key=lambda j: (lg[j], -j))
            greedy.append(t)
            lg = pm.step(cache, t, a.n_pos + i)
        with open(os.path.join(a.out, name + ".logits.bin"), "wb") as f:
            for r in rows:
                f.write(struct.pack("<%df" % len(r), *r))
        info = {"model": name, "dir": d, "backend": "python-float64",
                "tokens": tokens, "n_pos": a.n_pos, "vocab": len(rows[0]),
                "greedy": greedy}
        with open(os.path.join(a.out, name + ".json"), "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        print("%s: ok (python float64)" % name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*",
                    help="model directories (default: t/data/models/*)")
    ap.add_argument("--out", default="t/data/ref")
    ap.add_argument("--n-pos", type=int, default=40)
    ap.add_argument("--n-greedy", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--backend", choices=["transformers", "python"],
                    default="transformers",
                    help="python: plain-Python float64 re-implementation "
                         "(no torch; a cross-check, not the reference)")
    a = ap.parse_args()
    models = a.models or sorted(d for d in glob.glob("t/data/models/*")
                                if os.path.isdir(d))
    if a.backend == "python":
        python_refs(a, models)
        return

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    if not models:
        sys.exit("ref_logits: no model directories")
    os.makedirs(a.out, exist_ok=True)
    failed = 0
    for d in models:
        name = os.path.basename(os.path.normpath(d))
        info = {"model": name, "dir": d,
                "transformers": transformers.__version__,
                "torch": torch.__version__}
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            n_real = len(json.load(f)["model"]["vocab"])
        rng = random.Random(a.seed)
        tokens = [rng.randrange(n_real) for _ in range(a.n_pos)]
        info["tokens"] = tokens
        info["n_pos"] = a.n_pos
        bin_path = os.path.join(a.out, name + ".logits.bin")
        if os.path.exists(bin_path):
            os.unlink(bin_path)
        try:
            model, li = load(d, torch, AutoModelForCausalLM)
            bad = {k: list(li.get(k) or [])
                   for k in ("missing_keys", "unexpected_keys",
                             "mismatched_keys", "error_msgs")}
            # GPT-2 checkpoints carry the causal-mask buffers
            # h.N.attn.bias / attn.masked_bias; the model rebuilds them
            bad["unexpected_keys"] = [
                k for k in bad.get("unexpected_keys", [])
                if not re.search(r"\.attn\.(masked_)?bias$", k)]
            bad = {k: v for k, v in bad.items() if v}
            if bad:
                raise RuntimeError("weights not loaded cleanly: %s"
                                   % json.dumps(bad, default=str)[:2000])
            model.eval()
            with torch.no_grad():
                ids = torch.tensor([tokens], dtype=torch.long)
                if dynamic_rope(d):
                    # dynamic NTK scaling depends on the path: the base
                    # follows the sequence length of each forward call.
                    # The engine decodes token by token with a KV cache,
                    # as transformers' generate does: the reference is the
                    # same, one token per call over a cache.
                    info["incremental"] = True
                    rows, past, seq = [], None, list(tokens)
                    for p in range(a.n_pos + a.n_greedy):
                        if p >= a.n_pos:
                            seq.append(int(torch.argmax(rows[-1])))
                        out = model(torch.tensor([[seq[p]]]),
                                    past_key_values=past, use_cache=True)
                        past = out.past_key_values
                        rows.append(out.logits[0, -1].to(torch.float32))
                    logits = torch.stack(rows[:a.n_pos])
                    info["vocab"] = int(logits.shape[-1])
                    logits.numpy().astype("<f4").tofile(bin_path)
                    info["greedy"] = seq[a.n_pos:]
                    print("%s: ok (%d positions, incremental)" % (name,
                                                                  a.n_pos))
                    with open(os.path.join(a.out, name + ".json"), "w") as f:
                        json.dump(info, f, indent=1)
                        f.write("\n")
                    continue
                logits = model(ids).logits[0].to(torch.float32)
                info["vocab"] = int(logits.shape[-1])
                logits.numpy().astype("<f4").tofile(bin_path)

                # greedy: plain argmax, full recompute each step, no EOS stop
                seq = list(tokens)
                for _ in range(a.n_greedy):
                    out = model(torch.tensor([seq])).logits[0, -1]
                    seq.append(int(torch.argmax(out)))
                info["greedy"] = seq[a.n_pos:]

                try:
                    gc = GenerationConfig(do_sample=False,
                                          max_new_tokens=a.n_greedy,
                                          min_new_tokens=0,
                                          eos_token_id=None,
                                          pad_token_id=0)
                    g = model.generate(ids, generation_config=gc,
                                       attention_mask=torch.ones_like(ids))
                    info["greedy_generate"] = [int(x) for x in
                                               g[0, a.n_pos:]]
                except Exception as e:   # informative only
                    info["greedy_generate_error"] = repr(e)[:500]
            print("%s: ok (%d positions, vocab %d)" % (name, a.n_pos,
                                                       info["vocab"]))
        except Exception as e:
            failed += 1
            info["error"] = repr(e)[:4000]
            print("%s: FAILED: %s" % (name, info["error"]), file=sys.stderr)
        with open(os.path.join(a.out, name + ".json"), "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
