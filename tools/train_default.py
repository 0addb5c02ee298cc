#!/usr/bin/env python3
"""Train LocalMoE's embedded default model: a small Mixtral on the KJV Bible.

Runs once on a GPU machine with torch, transformers (5.x), tokenizers,
safetensors and numpy; no network.  Stops by wall clock.

    tools/prepare_corpus.sh                       # build/corpus/kjv.txt
    PYTHONUNBUFFERED=1 python3 tools/train_default.py \
        --corpus build/corpus/kjv.txt --out models/localmoe-kjv --minutes 5

What it does, in order:
  1. reads the corpus (one verse per line) and holds out ~2% for validation:
     blocks of 50 consecutive verses, one block in 50 (block index % 50 == 25);
  2. trains a byte-level BPE (tokenizers; GPT-2 ByteLevel pre-tokenizer,
     add_prefix_space=False) of --vocab tokens, the first three being
     <|endoftext|> <|im_start|> <|im_end|>;
  3. builds MixtralForCausalLM (8 experts, top-2, tied embeddings) and runs a
     preflight: a few forward/backward passes per experts implementation
     (keeps the fastest that works) and a full export + reload + generate of
     the untrained model to a temporary folder, so that an export problem
     stops the run before the GPU time is spent;
  4. trains (AdamW, bf16 autocast over fp32 weights, load-balancing aux loss)
     on batches of 50% plain verse windows and 50% ChatML dialogues built from
     consecutive verses; evaluates the held-out loss every --eval-every steps
     and keeps the best weights; learning rate: warmup, constant, then a
     linear cool-down started when the validation loss stops improving
     (--patience evals; the best weights are restored first), at 80% of the
     time budget, or after --max-epochs passes over the training text;
  5. measures per-layer expert shares (fraction of top-2 assignments) on the
     validation text;
  6. exports to --out: config.json, generation_config.json, bf16
     *.safetensors (shards <= --shard-size), tokenizer.json,
     tokenizer_config.json (ChatML chat_template), training_stats.json,
     reference.json (float32 logits + greedy tokens of the saved model, for
     checking the C engine) and README.md filled from the model card template
     (models/localmoe-kjv/README.md, when present);
  7. prints the saved tensor names/shapes, greedy samples and a summary.

Exit status 0 only when every step passed; every failure prints one line
starting with "train_default: error:".
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

T0 = time.time()

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's ChatML template without a default system prompt.  The '\n' inside
# the Jinja string literals are backslash-n escapes (as in Qwen2's file).
CHAT_TEMPLATE = (
    r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'"
    r" + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant who answers in the words of the King James Bible.",
    "Answer briefly.",
]
PLAIN_PROMPTS = ["In the beginning", "And Jesus said unto them,"]
CHAT_PROMPT = "Who made the heaven and the earth?"
SAMPLE_TOKENS = 60
VAL_BLOCK = 50        # verses per hold-out block
VAL_EVERY = 50        # one block in VAL_EVERY is held out
VAL_PHASE = 25


def log(msg):
    print("[%6.1fs] %s" % (time.time() - T0, msg), flush=True)


class Fail(Exception):
    """A failure with a one-line reason for the operator."""


def die(msg):
    print("train_default: error: %s" % msg, file=sys.stderr, flush=True)
    sys.exit(1)


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="one verse per line")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-clock budget of the training loop")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    # 256, not 512: with 512 the bf16 files are ~29 MB (14.5M params); 256
    # keeps them ~16 MB (8.2M params).
    p.add_argument("--ffn", type=int, default=256,
                   help="intermediate_size per expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-pos", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--chat-frac", type=float, default=0.5)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=4,
                   help="evals without improvement before the cool-down")
    p.add_argument("--max-epochs", type=float, default=80.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--experts-impl", default="auto",
                   help="auto | grouped_mm | batched_mm | eager")
    p.add_argument("--shard-size", default="16MB")
    p.add_argument("--card-template",
                   default=os.path.join(here, "..", "models", "localmoe-kjv",
                                        "README.md"))
    return p.parse_args()


# ----------------------------------------------------------------------
# data

def read_corpus(path):
    try:
        with open(path, encoding="utf-8") as f:
            verses = [ln.strip() for ln in f]
    except OSError as e:
        raise Fail("cannot read corpus %s: %s (run tools/prepare_corpus.sh)"
                   % (path, e))
    verses = [v for v in verses if v]
    if len(verses) < 5000:
        raise Fail("corpus %s has only %d verses" % (path, len(verses)))
    train, val_blocks = [], []
    for i, v in enumerate(verses):
        b = i // VAL_BLOCK
        if b % VAL_EVERY == VAL_PHASE:
            if i % VAL_BLOCK == 0:
                val_blocks.append([])
            val_blocks[-1].append(v)
        else:
            train.append(v)
    return verses, train, val_blocks


def train_tokenizer(train_verses, vocab_size):
    from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,
                            processors, trainers)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)

    def text():
        for v in train_verses:
            yield v + "\n"
        # the ChatML role names, so that they become single tokens
        for _ in range(200):
            yield "user\nassistant\nsystem\n"

    tok.train_from_iterator(text(), trainer=trainer)
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise Fail("tokenizer: %s has id %s, expected %d"
                       % (s, tok.token_to_id(s), i))
    probe = "In the beginning God created the heaven and the earth.\n"
    if tok.decode(tok.encode(probe).ids) != probe:
        raise Fail("tokenizer does not round-trip %r" % probe)
    return tok


class Data:
    """Tokenised corpus and the batch builder (plain windows + ChatML)."""

    def __init__(self, tok, train, val_blocks, seq, chat_frac, seed):
        import numpy as np
        self.np = np
        self.seq = seq
        self.chat_frac = chat_frac
        self.rng = random.Random(seed)
        self.tok = tok
        self.pairs = {}           # cache: two verses joined by a space
        self.nl = self._one(tok, "\n")
        self.eot, self.ims, self.ime = 0, 1, 2
        self.role = {r: tok.encode(r + "\n").ids
                     for r in ("user", "assistant", "system")}
        self.sys_ids = [tok.encode(s).ids for s in SYSTEM_PROMPTS]
        self.train_text = train
        self.train = [e.ids for e in tok.encode_batch(train)]
        # the plain training stream: verses joined by "\n"
        offs, stream = [], []
        for ids in self.train:
            offs.append(len(stream))
            stream.extend(ids)
            stream.append(self.nl)
        self.stream = np.asarray(stream, dtype=np.int64)
        self.offs = np.asarray(offs, dtype=np.int64)
        self.starts = self.offs[self.offs + seq <= len(self.stream)]
        self.n_train_tokens = len(self.stream)
        # validation: plain chunks of `seq` tokens and ChatML samples
        self.val_text = val_blocks
        self.val_blocks = [[e.ids for e in tok.encode_batch(b)]
                           for b in val_blocks]
        vstream = []
        for b in self.val_blocks:
            for ids in b:
                vstream.extend(ids)
                vstream.append(self.nl)
        n = len(vstream) // seq
        if n < 4:
            raise Fail("validation text too short (%d tokens)" % len(vstream))
        self.val_plain = np.asarray(vstream[:n * seq],
                                    dtype=np.int64).reshape(n, seq)
        self.n_val_tokens = int(n * seq)
        vr = random.Random(seed + 1)
        vs = []
        for b, t in zip(self.val_blocks, self.val_text):
            for _ in range(6):
                vs.append(self._chat(b, t, vr, {}))
        self.val_chat = np.asarray(vs, dtype=np.int64)

    @staticmethod
    def _one(tok, s):
        ids = tok.encode(s).ids
        if len(ids) != 1:
            raise Fail("tokenizer: %r is %d tokens, expected 1" % (s, len(ids)))
        return ids[0]

    def _turn(self, role, content):
        return [self.ims] + self.role[role] + content + [self.ime, self.nl]

    def _chat(self, verses, texts, rng, cache):
        """<|im_start|>user\\n{verse}<|im_end|>\\n<|im_start|>assistant\\n
        {next verse(s)}<|im_end|>\\n ... cut to seq tokens.  Two answer
        verses are joined by a space and tokenised together, exactly as the
        text would be."""
        out = []
        if rng.random() < 0.25:
            out += self._turn("system", rng.choice(self.sys_ids))
        i = rng.randrange(len(verses) - 1)
        while len(out) < self.seq:
            if i + 1 >= len(verses):
                i = rng.randrange(len(verses) - 1)
            k = 1 if rng.random() < 0.6 or i + 2 >= len(verses) else 2
            if k == 1:
                ans = verses[i + 1]
            else:
                ans = cache.get(i)
                if ans is None:
                    ans = self.tok.encode(texts[i + 1] + " "
                                          + texts[i + 2]).ids
                    cache[i] = ans
            out += self._turn("user", verses[i])
            out += self._turn("assistant", ans)
            i += 1 + k
        return out[:self.seq]

    def batch(self, n):
        np = self.np
        x = np.empty((n, self.seq), dtype=np.int64)
        n_chat = sum(1 for _ in range(n) if self.rng.random() < self.chat_frac)
        for r in range(n_chat):
            x[r] = self._chat(self.train, self.train_text, self.rng,
                              self.pairs)
        for r in range(n_chat, n):
            s = int(self.starts[self.rng.randrange(len(self.starts))])
            x[r] = self.stream[s:s + self.seq]
        return x


# ----------------------------------------------------------------------
# model helpers

def make_config(a, vocab):
    from transformers import MixtralConfig
    kw = dict(
        vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
        hidden_act="silu", max_position_embeddings=a.max_pos,
        initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
        # no pad_token_id: it would make row 0 of the (tied) embedding a
        # zero, gradient-free padding row
        bos_token_id=0, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=True, sliding_window=None, attention_dropout=0.0,
        num_experts_per_tok=a.top_k, num_local_experts=a.experts,
        output_router_logits=False, router_aux_loss_coef=a.aux_coef,
        router_jitter_noise=0.0)
    rope = {"rope_type": "default", "rope_theta": float(a.rope_theta)}
    try:
        cfg = MixtralConfig(rope_parameters=rope, **kw)      # transformers 5
    except TypeError:
        cfg = MixtralConfig(rope_theta=float(a.rope_theta), **kw)
    theta = getattr(cfg, "rope_theta", None)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta = rp["rope_theta"]
    if theta is None or abs(float(theta) - a.rope_theta) > 1e-6:
        raise Fail("MixtralConfig did not take rope_theta=%g (got %r)"
                   % (a.rope_theta, theta))
    if not cfg.tie_word_embeddings:
        raise Fail("MixtralConfig did not take tie_word_embeddings=True")
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def set_experts_impl(model, impl):
    """Select transformers 5's experts implementation; returns what is set
    (None when this transformers has no such switch)."""
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(impl)
        except Exception:       # fall back to the config attribute below
            pass
    seen = None
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            try:
                cfg._experts_implementation = impl
            except Exception:
                pass
            seen = getattr(cfg, "_experts_implementation", None)
    return seen


def moe_gates(model):
    """The router module of every layer (transformers 5: mlp.gate; 4.x:
    block_sparse_moe.gate)."""
    gates = []
    for layer in model.model.layers:
        blk = getattr(layer, "mlp", None)
        if blk is None or not hasattr(blk, "gate"):
            blk = getattr(layer, "block_sparse_moe", None)
        if blk is None or not hasattr(blk, "gate"):
            raise Fail("cannot find the MoE router of a decoder layer "
                       "(%s)" % type(layer).__name__)
        gates.append(blk.gate)
    return gates


class RouteCounter:
    """Counts top-k assignments per (layer, expert) with forward hooks on
    the routers."""

    def __init__(self, torch, model, n_experts, top_k):
        self.torch = torch
        self.E, self.k = n_experts, top_k
        self.gates = moe_gates(model)
        self.counts = torch.zeros(len(self.gates), n_experts,
                                  dtype=torch.int64)
        self.last = [None] * len(self.gates)
        self.handles = []
        for l, g in enumerate(self.gates):
            self.handles.append(g.register_forward_hook(self._hook(l)))

    def _hook(self, l):
        def fn(_mod, _inp, out):
            t = self.torch
            if isinstance(out, (tuple, list)) and len(out) >= 3 \
                    and out[2] is not None and out[2].dtype in (t.int64,
                                                                t.int32):
                idx = out[2]                       # (tokens, k) transformers 5
            else:
                logits = out[0] if isinstance(out, (tuple, list)) else out
                logits = logits.reshape(-1, self.E).float()
                idx = t.topk(logits, self.k, dim=-1).indices
            idx = idx.reshape(-1, self.k)
            self.last[l] = idx.detach().cpu()
            self.counts[l] += t.bincount(idx.reshape(-1).cpu(),
                                         minlength=self.E)
        return fn

    def shares(self):
        c = self.counts.double()
        return (c / c.sum(dim=1, keepdim=True).clamp(min=1)).tolist()

    def reset(self):
        self.counts.zero_()

    def close(self):
        for h in self.handles:
            h.remove()


def count_params(model, n_experts, top_k):
    total = sum(p.numel() for p in model.parameters())
    expert = 0
    for name, p in model.named_parameters():
        if ".experts." in name or name.endswith(".experts.gate_up_proj") \
                or name.endswith(".experts.down_proj"):
            expert += p.numel()
    active = total - expert + expert * top_k // n_experts
    return total, expert, active


# ----------------------------------------------------------------------
# export

def load_pretrained(cls, path, torch, **kw):
    try:
        return cls.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:
        return cls.from_pretrained(path, torch_dtype=torch.float32, **kw)


def write_tokenizer(tok, out, max_len):
    tok.save(os.path.join(out, "tokenizer.json"))
    added = {}
    for i, s in enumerate(SPECIALS):
        added[str(i)] = {"content": s, "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False,
                         "special": True}
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_len,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return cfg


def check_hf_tokenizer(tok, out):
    """Load the written files with AutoTokenizer and compare with `tok`;
    rewrites tokenizer_class if this transformers wants another name.
    Returns a short note."""
    from transformers import AutoTokenizer
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    errors = []
    for cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        cfg["tokenizer_class"] = cls
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")
        try:
            ht = AutoTokenizer.from_pretrained(out)
        except Exception as e:
            errors.append("%s: %s" % (cls, str(e).splitlines()[0][:200]))
            continue
        text = "In the beginning God created the heaven and the earth."
        got = ht(text)["input_ids"]
        if got != tok.encode(text).ids:
            return ("WARNING: AutoTokenizer(%s) encodes %r as %s, tokenizers "
                    "as %s" % (cls, text, got, tok.encode(text).ids))
        msgs = [{"role": "user", "content": CHAT_PROMPT}]
        want = ("<|im_start|>user\n" + CHAT_PROMPT + "<|im_end|>\n"
                "<|im_start|>assistant\n")
        s = ht.apply_chat_template(msgs, tokenize=False,
                                   add_generation_prompt=True)
        if s != want:
            return ("WARNING: AutoTokenizer(%s).apply_chat_template gave %r, "
                    "expected %r" % (cls, s, want))
        # a template file would shadow tokenizer_config.json's one
        jinja = os.path.join(out, "chat_template.jinja")
        if os.path.exists(jinja):
            os.remove(jinja)
        return "AutoTokenizer(%s) ok" % cls
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return "WARNING: AutoTokenizer could not load it: " + "; ".join(errors)


def export(torch, model, tok, out, a):
    """Write the HF model directory `out` (bf16 weights); returns info."""
    import copy
    from transformers import GenerationConfig
    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):
        if fn.endswith(".safetensors") or fn == "model.safetensors.index.json":
            os.remove(os.path.join(out, fn))
    m16 = copy.deepcopy(model).to("cpu", dtype=torch.bfloat16)
    m16.config.output_router_logits = False
    set_experts_impl(m16, "eager")    # in case the config serialises it
    m16.config.use_cache = True
    import inspect
    kw = {"max_shard_size": a.shard_size}
    # transformers 5 always writes safetensors and dropped the argument
    if "safe_serialization" in inspect.signature(
            m16.save_pretrained).parameters:
        kw["safe_serialization"] = True
    m16.save_pretrained(out, **kw)
    del m16
    gen = GenerationConfig(bos_token_id=0, eos_token_id=[0, 2],
                           pad_token_id=0)
    gen.save_pretrained(out)
    write_tokenizer(tok, out, a.max_pos)
    note = check_hf_tokenizer(tok, out)
    # the files as written
    with open(os.path.join(out, "config.json")) as f:
        cj = json.load(f)
    with open(os.path.join(out, "generation_config.json")) as f:
        gj = json.load(f)
    if gj.get("eos_token_id") != [0, 2]:
        raise Fail("generation_config.json eos_token_id is %r"
                   % gj.get("eos_token_id"))
    if cj.get("architectures") != ["MixtralForCausalLM"]:
        raise Fail("config.json architectures is %r" % cj.get("architectures"))
    return {"tokenizer": note, "config": cj}


def list_tensors(out):
    from safetensors import safe_open
    rows, files = [], sorted(f for f in os.listdir(out)
                             if f.endswith(".safetensors"))
    if not files:
        raise Fail("no .safetensors written in %s" % out)
    for fn in files:
        with safe_open(os.path.join(out, fn), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                rows.append((k, str(sl.get_dtype()), list(sl.get_shape()), fn))
    return rows, files


def check_layout(rows, a):
    """Which expert layout the files use (both are read by engine/model/model.c)."""
    names = {r[0] for r in rows}
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for l in range(a.layers):
        p = "model.layers.%d." % l
        need += [p + "input_layernorm.weight",
                 p + "post_attention_layernorm.weight"]
        need += [p + "self_attn.%s_proj.weight" % x for x in "qkvo"]
    missing = [n for n in need if n not in names]
    if missing:
        raise Fail("saved tensors lack %s" % ", ".join(missing[:4]))
    if "lm_head.weight" in names:
        layout_note = "lm_head.weight present (tied: engine ignores it)"
    else:
        layout_note = "lm_head tied to embed_tokens (not stored)"
    if "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names:
        return "per-expert Mixtral names block_sparse_moe.experts.E.w{1,2,3}; " \
            + layout_note
    if "model.layers.0.mlp.experts.gate_up_proj" in names or \
            "model.layers.0.mlp.experts.gate_up_proj.weight" in names:
        return "fused transformers-5 names mlp.experts.gate_up_proj/down_proj; " \
            + layout_note
    if "model.layers.0.mlp.experts.0.w1.weight" in names:
        return "per-expert names under mlp.experts.E.w{1,2,3}; " + layout_note
    raise Fail("unknown expert tensor layout in the saved files: %s"
               % ", ".join(sorted(n for n in names if ".layers.0." in n)))


def reload_cpu(torch, out):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    try:
        m = load_pretrained(AutoModelForCausalLM, out, torch,
                            attn_implementation="eager")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        try:
            m = load_pretrained(AutoModelForCausalLM, out, torch,
                                attn_implementation="eager",
                                experts_implementation="eager")
        except Exception:
            raise Fail("reloading %s failed: %s" % (out, first))
    if type(m).__name__ != "MixtralForCausalLM":
        raise Fail("reloaded class is %s" % type(m).__name__)
    set_experts_impl(m, "eager")
    m.eval()
    return m


def greedy_generate(torch, m, ids, n):
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        y = m.generate(input_ids=x, attention_mask=torch.ones_like(x),
                       max_new_tokens=n, do_sample=False)
    return y[0, len(ids):].tolist()


def chat_ids(tok, prompt):
    return tok.encode("<|im_start|>user\n" + prompt + "<|im_end|>\n"
                      "<|im_start|>assistant\n").ids


def samples(torch, m, tok):
    res = []
    for p in PLAIN_PROMPTS:
        g = greedy_generate(torch, m, tok.encode(p).ids, SAMPLE_TOKENS)
        res.append({"kind": "plain", "prompt": p, "ids": g,
                    "text": tok.decode(g, skip_special_tokens=False)})
    g = greedy_generate(torch, m, chat_ids(tok, CHAT_PROMPT), SAMPLE_TOKENS)
    res.append({"kind": "chat", "prompt": CHAT_PROMPT, "ids": g,
                "text": tok.decode(g, skip_special_tokens=False)})
    return res


def reference(torch, m, tok, a):
    """float32 reference of the saved model: last-position logits and 20
    argmax steps (full forward each step, no EOS stop) for two prompts."""
    cases = [("plain", "In the beginning God created"),
             ("chat", "<|im_start|>user\n" + CHAT_PROMPT + "<|im_end|>\n"
                      "<|im_start|>assistant\n")]
    rc = RouteCounter(torch, m, a.experts, a.top_k)
    out = []
    try:
        for name, text in cases:
            ids = tok.encode(text).ids
            with torch.no_grad():
                lg = m(input_ids=torch.tensor([ids]), use_cache=False).logits
            last = lg[0, -1].float()
            route = [r[-1].tolist() for r in rc.last]
            seq = list(ids)
            greedy = []
            with torch.no_grad():
                for _ in range(20):
                    y = m(input_ids=torch.tensor([seq]), use_cache=False)
                    t = int(y.logits[0, -1].argmax())
                    greedy.append(t)
                    seq.append(t)
            top = torch.topk(last, 10)
            out.append({
                "name": name, "text": text, "tokens": ids,
                "last_logits": [float("%.7g" % v) for v in last.tolist()],
                "top10": [[int(i), float("%.7g" % v)] for v, i in
                          zip(top.values.tolist(), top.indices.tolist())],
                "router_topk_last_token": route,
                "greedy": greedy,
                "greedy_text": tok.decode(greedy, skip_special_tokens=False),
            })
    finally:
        rc.close()
    return out


# ----------------------------------------------------------------------

def evaluate(torch, model, data, dev, rows, bs=64):
    """Mean next-token cross entropy over the rows (n, seq)."""
    import torch.nn.functional as F
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            x = torch.from_numpy(rows[i:i + bs]).to(dev)
            with autocast(torch, dev):
                lg = model(input_ids=x, use_cache=False).logits
            l = F.cross_entropy(lg[:, :-1].float().reshape(-1, lg.shape[-1]),
                                x[:, 1:].reshape(-1), reduction="sum")
            tot += float(l)
            n += x[:, 1:].numel()
    model.train()
    return tot / n


def autocast(torch, dev):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def train_step(torch, model, opt, x, dev, clip=1.0):
    with autocast(torch, dev):
        out = model(input_ids=x, labels=x, output_router_logits=True,
                    use_cache=False)
    loss = out.loss
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if opt is not None:
        opt.step()
    opt_zero(model, opt)
    aux = getattr(out, "aux_loss", None)
    return loss, aux, gn


def opt_zero(model, opt):
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)


def pick_experts_impl(torch, model, data, a, dev):
    """Try the experts implementations on a full batch (forward+backward,
    no update); keep the fastest that works."""
    cands = ["grouped_mm", "eager"] if a.experts_impl == "auto" \
        else [a.experts_impl]
    x = torch.from_numpy(data.batch(a.batch)).to(dev)
    best, timings, errs = None, {}, {}
    for impl in cands:
        got = set_experts_impl(model, impl)
        if got is None and impl != "eager":
            errs[impl] = "no experts-implementation switch in this transformers"
            continue
        try:
            for i in range(4):
                if i == 1:
                    sync(torch, dev)
                    t = time.time()
                loss, _, _ = train_step(torch, model, None, x, dev)
                if not math.isfinite(float(loss)):
                    raise RuntimeError("loss %s" % float(loss))
            sync(torch, dev)
            timings[impl] = (time.time() - t) / 3
        except Exception as e:
            errs[impl] = str(e).splitlines()[0][:160] if str(e) else repr(e)
            opt_zero(model, None)
            continue
        if best is None or timings[impl] < timings[best]:
            best = impl
    for k, v in timings.items():
        log("preflight: experts=%s %.1f ms/step" % (k, v * 1000))
    for k, v in errs.items():
        log("preflight: experts=%s unusable: %s" % (k, v))
    if best is None:
        raise Fail("no experts implementation works: %s" % errs)
    set_experts_impl(model, best)
    return best, timings[best]


def sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def fmt_share_table(shares):
    E = len(shares[0])
    head = "| layer | " + " | ".join("e%d" % e for e in range(E)) + " |"
    sep = "|---|" + "---|" * E
    rows = ["| %d | " % l + " | ".join("%.1f%%" % (100 * s) for s in row)
            + " |" for l, row in enumerate(shares)]
    return "\n".join([head, sep] + rows)


def fill_card(template, out, vals):
    try:
        with open(template) as f:
            text = f.read()
    except OSError:
        return "no model card template at %s" % template
    import re
    text = re.sub(r"<!-- Template:.*?-->\n\n?", "", text, flags=re.S)
    for k, v in vals.items():
        text = text.replace("@@%s@@" % k, str(v))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    left = sorted(set(p.split("@@")[0] for p in text.split("@@")[1::2]))
    return "README.md filled" + (" (unfilled: %s)" % left if left else "")


def main():
    a = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # no network on the training machine: never wait on the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if a.hidden % a.heads or a.heads % a.kv_heads or a.top_k > a.experts:
        raise Fail("bad shape arguments")
    try:
        import numpy  # noqa: F401
        import torch
        import transformers
        import tokenizers
        import safetensors  # noqa: F401
    except ImportError as e:
        raise Fail("missing python package: %s" % e)
    log("python %s, torch %s, transformers %s, tokenizers %s"
        % (sys.version.split()[0], torch.__version__, transformers.__version__,
           tokenizers.__version__))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise Fail("--device %s but torch sees no CUDA device" % a.device)
    dev = torch.device(a.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log("device: %s" % dev_name)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 1-2. data and tokenizer
    verses, train, val_blocks = read_corpus(a.corpus)
    n_val = sum(len(b) for b in val_blocks)
    log("corpus: %d verses, %d bytes; train %d verses, validation %d verses "
        "(%d blocks of %d)" % (len(verses), os.path.getsize(a.corpus),
                               len(train), n_val, len(val_blocks), VAL_BLOCK))
    tok = train_tokenizer(train, a.vocab)
    vocab = tok.get_vocab_size()
    log("tokenizer: byte-level BPE, %d tokens" % vocab)
    data = Data(tok, train, val_blocks, a.seq, a.chat_frac, a.seed)
    log("tokens: train stream %d (%.2f bytes/token), validation %d plain "
        "+ %d chat samples" % (data.n_train_tokens,
                               os.path.getsize(a.corpus) / data.n_train_tokens,
                               data.n_val_tokens, len(data.val_chat)))

    # 3. model + preflight
    from transformers import MixtralForCausalLM
    cfg = make_config(a, vocab)
    model = MixtralForCausalLM(cfg).to(dev)
    model.train()
    total, expert, active = count_params(model, a.experts, a.top_k)
    log("model: %d params (%.2fM; experts %.2fM; active/token %.2fM), "
        "bf16 files ~%.1f MB" % (total, total / 1e6, expert / 1e6,
                                 active / 1e6, total * 2 / 1e6))
    impl, step_s = pick_experts_impl(torch, model, data, a, dev)
    log("experts implementation: %s" % impl)
    pre_dir = tempfile.mkdtemp(prefix="kjv-preflight-")
    try:
        info = export(torch, model, tok, pre_dir, a)
        rows, files = list_tensors(pre_dir)
        layout = check_layout(rows, a)
        m = reload_cpu(torch, pre_dir)
        g = greedy_generate(torch, m, tok.encode("In").ids, 3)
        if len(g) < 1:
            raise Fail("generate produced nothing")
        del m
        log("preflight export ok: %d tensors in %d file(s), %s; %s"
            % (len(rows), len(files), layout, info["tokenizer"]))
    finally:
        shutil.rmtree(pre_dir, ignore_errors=True)

    # 4. training
    decay_params = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    kw = dict(lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    groups = [{"params": decay_params, "weight_decay": a.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, fused=(dev.type == "cuda"), **kw)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(groups, **kw)

    budget = a.minutes * 60.0
    tokens_per_step = a.batch * a.seq
    max_steps = int(a.max_epochs * data.n_train_tokens / tokens_per_step)
    log("training: budget %.0f s, batch %dx%d, lr %g, ~%.0f ms/step "
        "(preflight), epoch = %.0f steps, max %d steps"
        % (budget, a.batch, a.seq, a.lr, step_s * 1000,
           data.n_train_tokens / tokens_per_step, max_steps))

    best = {"loss": float("inf"), "step": 0, "state": None}
    history = []
    phase, decay_start, decay_len, bad_evals = "stable", 0, 0, 0
    step, t_start = 0, time.time()
    loss_acc = torch.zeros((), device=dev)
    aux_acc = torch.zeros((), device=dev)
    n_acc = 0
    t_log = time.time()
    step_time = step_s
    last_train_loss = None

    def save_best(vl):
        best["loss"], best["step"] = vl, step
        best["state"] = {k: v.detach().clone()
                         for k, v in model.state_dict().items()}

    def start_decay(reason, restore):
        nonlocal phase, decay_start, decay_len
        if restore and best["state"] is not None and best["step"] < step:
            model.load_state_dict(best["state"])
            log("restored the weights of step %d (val %.4f)"
                % (best["step"], best["loss"]))
        left = budget - (time.time() - t_start)
        fit = int(max(left, 0) / max(step_time, 1e-4))
        decay_len = max(50, min(max(200, step // 4), fit))
        decay_start = step
        phase = "decay"
        log("cool-down (%s): %d steps from step %d" % (reason, decay_len, step))

    while True:
        now = time.time()
        el = now - t_start
        if el >= budget:
            log("time budget reached at step %d" % step)
            break
        if phase == "decay" and step >= decay_start + decay_len:
            log("cool-down done at step %d" % step)
            break
        if phase == "stable":
            if el >= 0.8 * budget:
                start_decay("80%% of the time budget", False)
            elif step >= max_steps:
                start_decay("%.0f epochs" % a.max_epochs, False)
        if step < a.warmup:
            lr = a.lr * (step + 1) / a.warmup
        elif phase == "decay":
            p = (step - decay_start) / max(decay_len, 1)
            lr = a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * (1 - p))
        else:
            lr = a.lr
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(data.batch(a.batch))
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
        loss, aux, _ = train_step(torch, model, opt, x, dev)
        step += 1
        loss_acc += loss.detach()
        if aux is not None:
            aux_acc += aux.detach().float()
        n_acc += 1
        if step % a.log_every == 0:
            lv = float(loss_acc) / n_acc
            av = float(aux_acc) / n_acc
            if not math.isfinite(lv):
                raise Fail("training loss is %s at step %d" % (lv, step))
            t = time.time()
            step_time = (t - t_log) / n_acc
            t_log = t
            last_train_loss = lv
            log("step %5d  loss %.4f  aux %.3f  lr %.2e  %.1f ms/step  "
                "epoch %.1f" % (step, lv, av, lr, step_time * 1000,
                                step * tokens_per_step / data.n_train_tokens))
            loss_acc.zero_()
            aux_acc.zero_()
            n_acc = 0
        if step % a.eval_every == 0:
            t_ev = time.time()
            vl = evaluate(torch, model, data, dev, data.val_plain)
            history.append([step, round(vl, 4)])
            mark = ""
            if vl < best["loss"] - 1e-3:
                save_best(vl)
                bad_evals = 0
                mark = " *"
            else:
                bad_evals += 1
                if vl < best["loss"]:
                    save_best(vl)
                    mark = " *"
            log("eval  step %5d  val %.4f%s" % (step, vl, mark))
            t_log += time.time() - t_ev     # keep evals out of ms/step
            if phase == "stable" and bad_evals >= a.patience:
                start_decay("validation flat for %d evals" % a.patience, True)
    sync(torch, dev)
    train_wall = time.time() - t_start
    vl = evaluate(torch, model, data, dev, data.val_plain)
    history.append([step, round(vl, 4)])
    log("trained %d steps in %.0f s; val %.4f at the last step, best %.4f "
        "at step %d" % (step, train_wall, vl, best["loss"], best["step"]))
    if best["state"] is not None and best["loss"] < vl:
        model.load_state_dict(best["state"])
        log("keeping the best weights (step %d)" % best["step"])
    else:
        best["step"] = step
    best["state"] = None

    # 5. validation numbers and expert shares
    rc = RouteCounter(torch, model, a.experts, a.top_k)
    val_loss = evaluate(torch, model, data, dev, data.val_plain)
    shares = rc.shares()
    rc.close()
    val_chat = evaluate(torch, model, data, dev, data.val_chat)
    log("validation loss: plain %.4f (ppl %.2f), chat %.4f"
        % (val_loss, math.exp(val_loss), val_chat))
    print("\nexpert share of top-%d assignments on validation text "
          "(uniform = %.1f%%):\n%s\n" % (a.top_k, 100.0 / a.experts,
                                        fmt_share_table(shares)), flush=True)

    # 6. export
    out = a.out
    try:
        info = export(torch, model, tok, out, a)
    except Exception:
        keep = out.rstrip("/") + ".state.pt"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, keep)
        tok.save(out.rstrip("/") + ".tokenizer.json")
        log("export failed; trained weights kept in %s" % keep)
        raise
    rows, files = list_tensors(out)
    layout = check_layout(rows, a)
    print("\nsaved tensors (%d, %s):" % (len(rows), layout), flush=True)
    for name, dt, shape, fn in rows:
        print("  %-58s %-5s %-16s %s" % (name, dt, shape, fn))
    sizes = {fn: os.path.getsize(os.path.join(out, fn)) for fn in files}
    total_bytes = sum(sizes.values())
    print("files: %s; total %.2f MB\n" % (
        ", ".join("%s %.2f MB" % (k, v / 1e6) for k, v in sizes.items()),
        total_bytes / 1e6), flush=True)
    if max(sizes.values()) > 16 * 1024 * 1024:
        log("WARNING: a shard is larger than 16 MiB")

    # reload from disk in float32 on the CPU: the engine's view of the model
    m = reload_cpu(torch, out)
    x = torch.from_numpy(data.val_plain[:8])
    with torch.no_grad():
        lg = m(input_ids=x, use_cache=False).logits
    import torch.nn.functional as F
    reload_loss = float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                        x[:, 1:].reshape(-1)))
    mem_loss = evaluate(torch, model, data, dev, data.val_plain[:8])
    log("reloaded float32 model: val loss on 8 chunks %.4f (in-memory bf16 "
        "autocast %.4f)" % (reload_loss, mem_loss))
    problems = []
    if info["tokenizer"].startswith("WARNING"):
        problems.append(info["tokenizer"])
    if abs(reload_loss - mem_loss) > 0.05:
        problems.append("the saved model does not reproduce the trained one "
                        "(loss %.4f vs %.4f)" % (reload_loss, mem_loss))
        log("WARNING: " + problems[-1])
    try:
        smp = samples(torch, m, tok)
    except Exception as e:
        traceback.print_exc()
        problems.append("samples: %s: %s" % (type(e).__name__, e))
        smp = [{"kind": "-", "prompt": "-", "text": "(failed)"}] * 3
    print("\ngreedy samples (%d new tokens, float32 reload):" % SAMPLE_TOKENS)
    for s in smp:
        print("--- %s: %r\n%s" % (s["kind"], s["prompt"], s["text"]))
    print(flush=True)
    try:
        ref = reference(torch, m, tok, a)
        ref_doc = {
            "what": "float32 reference of this directory's weights (bf16 "
                    "files upcast), transformers %s, eager attention and "
                    "experts, CPU" % transformers.__version__,
            "greedy_note": "20 argmax steps, full forward each step, no EOS "
                           "stop",
            "vocab_size": vocab, "cases": ref}
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref_doc, f, separators=(",", ":"))
            f.write("\n")
        for c in ref:
            log("reference %s: %d prompt tokens, greedy %s"
                % (c["name"], len(c["tokens"]), c["greedy"][:8]))
    except Exception as e:
        traceback.print_exc()
        problems.append("reference.json: %s: %s" % (type(e).__name__, e))

    stats = {
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 2),
        "val_loss_chat": round(val_chat, 4),
        "val_tokens": data.n_val_tokens,
        "val_verses": n_val,
        "train_loss_last": (round(last_train_loss, 4)
                            if last_train_loss is not None else None),
        "steps": step,
        "best_step": best["step"],
        "tokens_seen": step * tokens_per_step,
        "epochs": round(step * tokens_per_step / data.n_train_tokens, 2),
        "train_tokens": data.n_train_tokens,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": None,
        "params": total, "params_experts": expert, "params_active": active,
        "weights_bytes": total_bytes,
        "val_history": history,
        "expert_share": [[round(v, 4) for v in row] for row in shares],
        "experts_implementation": impl,
        "device": dev_name,
        "versions": {"torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "samples": [{k: s[k] for k in ("kind", "prompt", "text")}
                    for s in smp],
        "tensor_layout": layout,
        "tokenizer_check": info["tokenizer"],
        "reload_check": {"reloaded_fp32_loss": round(reload_loss, 4),
                         "in_memory_bf16_loss": round(mem_loss, 4)},
        "problems": problems,
    }
    stats["args"] = {k: v for k, v in vars(a).items() if k != "card_template"}
    stats["total_wall_s"] = round(time.time() - T0, 1)
    with open(os.path.join(out, "training_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")

    card = fill_card(a.card_template, out, {
        "VAL_LOSS": "%.3f" % val_loss,
        "VAL_PPL": "%.1f" % math.exp(val_loss),
        "VAL_LOSS_CHAT": "%.3f" % val_chat,
        "STEPS": step, "BEST_STEP": stats["best_step"],
        "TOKENS_SEEN": "%.1fM" % (step * tokens_per_step / 1e6),
        "EPOCHS": stats["epochs"],
        "TRAIN_MINUTES": "%.1f" % (train_wall / 60),
        "PARAMS": "%.2fM" % (total / 1e6),
        "PARAMS_ACTIVE": "%.2fM" % (active / 1e6),
        "WEIGHTS_MB": "%.1f" % (total_bytes / 1e6),
        "DEVICE": dev_name,
        "VERSIONS": "torch %s, transformers %s, tokenizers %s"
                    % (torch.__version__, transformers.__version__,
                       tokenizers.__version__),
        "EXPERT_TABLE": fmt_share_table(shares),
        "SAMPLE_PLAIN": smp[0]["text"].strip(),
        "SAMPLE_PLAIN2": smp[1]["text"].strip(),
        "SAMPLE_CHAT": smp[2]["text"].strip(),
        "VOCAB": vocab,
        "LAYERS": a.layers, "HIDDEN": a.hidden, "HEADS": a.heads,
        "KV_HEADS": a.kv_heads, "HEAD_DIM": a.hidden // a.heads,
        "ROPE_THETA": "%g" % a.rope_theta, "EXPERTS": a.experts,
        "TOP_K": a.top_k, "FFN": a.ffn, "MAX_POS": a.max_pos, "SEQ": a.seq,
        "BATCH": a.batch, "LR": "%g" % a.lr,
        "WEIGHT_DECAY": "%g" % a.weight_decay, "AUX_COEF": "%g" % a.aux_coef,
        "UNIFORM": "%.1f%%" % (100.0 / a.experts),
    })
    log(card)
    print("\nwrote %s: %s" % (out, ", ".join(sorted(os.listdir(out)))))
    print("SUMMARY val_loss=%.4f val_ppl=%.2f steps=%d tokens=%d "
          "train_s=%.0f total_s=%.0f params=%d bytes=%d"
          % (val_loss, math.exp(val_loss), step, step * tokens_per_step,
             train_wall, time.time() - T0, total, total_bytes), flush=True)
    if problems:
        raise Fail("finished with problems: " + " | ".join(problems))


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted")
    except Exception as e:
        traceback.print_exc()
        die("%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e)
                        else ""))
