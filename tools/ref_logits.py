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
import sys


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*",
                    help="model directories (default: t/data/models/*)")
    ap.add_argument("--out", default="t/data/ref")
    ap.add_argument("--n-pos", type=int, default=40)
    ap.add_argument("--n-greedy", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    models = a.models or sorted(d for d in glob.glob("t/data/models/*")
                                if os.path.isdir(d))
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
            bad = {k: v for k, v in bad.items() if v}
            if bad:
                raise RuntimeError("weights not loaded cleanly: %s"
                                   % json.dumps(bad, default=str)[:2000])
            model.eval()
            with torch.no_grad():
                ids = torch.tensor([tokens], dtype=torch.long)
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
