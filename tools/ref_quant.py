#!/usr/bin/env python3
"""The C engine on quantized checkpoints against Hugging Face transformers.

For each quantized tiny model (tools/quant_models.sh writes them, with a
dequantized f32 reference <name>.ref beside each), this script

  * loads <name>.ref in transformers (float32, eager attention), feeds a
    fixed 12-token prompt and 8 greedy tokens (argmax, no EOS stop), and
    keeps the logits of the last 9 positions;
  * runs the C engine's CPU path on the quantized directory itself
    (build/moe logits --all, which dequantizes at load: engine/model/
    quant.h) for the same 9 prefixes and checks each position's logits
    within 1e-4 of transformers' (relative to the largest |logit|) and the
    greedy tokens equal;
  * for fp8 checkpoints, also tries transformers' own loading of the
    quantized directory (FineGrainedFP8 / compressed-tensors, where the
    installed transformers supports it and a GPU is there) and prints how
    far the engine is from it (information only: transformers then runs
    its own fp8 kernels, bf16 activations).

Optional: without torch/transformers it prints "SKIP" and exits 0.

Usage (repository root, after make; on the GPU machine):
    tools/quant_models.sh build/quant
    python3 tools/ref_quant.py build/quant            # every model in MODELS
    python3 tools/ref_quant.py build/quant awq-g32    # some of them
Exit status 1 when a comparison against the reference fails.
"""

import argparse
import os
import subprocess
import sys

N_PROMPT = 12
N_GREEDY = 8
TOL = 1e-4


def engine_logits(moe, qdir, ids):
    out = subprocess.run([moe, "logits", "-m", qdir, "--ids",
                          ",".join(str(i) for i in ids), "--all"],
                         check=True, capture_output=True, text=True).stdout
    vals = {}
    for line in out.splitlines():
        i, v = line.split("\t")
        vals[int(i)] = float(v)
    return [vals[i] for i in range(len(vals))]


def load(path, torch, cls, **kw):
    try:
        return cls.from_pretrained(path, dtype=torch.float32,
                                   attn_implementation="eager", **kw)
    except TypeError:
        return cls.from_pretrained(path, torch_dtype=torch.float32,
                                   attn_implementation="eager", **kw)


def hf_run(model, torch, prompt):
    """logits (list of lists) of the last N_GREEDY + 1 positions and the
    greedy tokens, token by token argmax"""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(N_GREEDY):
            x = torch.tensor([ids], device=model.device)
            lg = model(x).logits[0, -1].float()
            ids.append(int(torch.argmax(lg)))
        x = torch.tensor([ids], device=model.device)
        lg = model(x).logits[0].float().cpu()
    rows = [lg[p].tolist() for p in range(N_PROMPT - 1, len(ids))]
    return rows, ids[N_PROMPT:]


def rel_diff(a, b):
    mx = max(abs(v) for v in b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b)) / mx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default="build/quant")
    ap.add_argument("names", nargs="*")
    ap.add_argument("--moe", default="build/moe")
    a = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print("SKIP: torch / transformers not installed (%s)" % e)
        return 0
    names = a.names or [l.strip() for l in
                        open(os.path.join(a.dir, "MODELS")) if l.strip()]
    bad = 0
    for name in names:
        q = os.path.join(a.dir, name)
        ref = q + ".ref"
        m = load(ref, torch, AutoModelForCausalLM)
        m.eval()
        V = m.config.vocab_size
        prompt = [(i * 37 + 11) % V for i in range(N_PROMPT)]
        rows, greedy = hf_run(m, torch, prompt)
        worst, same = 0.0, True
        ids = list(prompt)
        for p, row in enumerate(rows):
            e = engine_logits(a.moe, q, ids)
            worst = max(worst, rel_diff(e, row))
            top = max(range(len(e)), key=e.__getitem__)
            if p < N_GREEDY:
                same = same and top == greedy[p]
                ids.append(greedy[p])
        ok = worst <= TOL and same
        bad += not ok
        print("%s %s: engine vs transformers on the dequantized reference: "
              "max rel diff %.3g (tol %g), greedy %s" %
              ("ok" if ok else "FAIL", name, worst, TOL,
               "equal" if same else "DIFFERENT"))
        if "fp8" in name:
            try:
                dev = "cuda" if torch.cuda.is_available() else "cpu"
                nat = AutoModelForCausalLM.from_pretrained(
                    q, device_map=dev, attn_implementation="eager")
                nat.eval()
                nrows, ngreedy = hf_run(nat, torch, prompt)
                nworst = max(rel_diff(r2, r1)
                             for r1, r2 in zip(nrows, rows))
                print("info %s: transformers' own fp8 loading vs its "
                      "dequantized reference: max rel diff %.3g, greedy "
                      "%s" % (name, nworst, "equal" if ngreedy == greedy
                              else "different"))
            except Exception as ex:     # noqa: BLE001 (any loader failure)
                print("info %s: transformers cannot load it natively "
                      "here: %s" % (name, str(ex).splitlines()[0][:160]))
    print("%d of %d models failed" % (bad, len(names)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
