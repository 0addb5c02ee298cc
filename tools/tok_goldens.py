#!/usr/bin/env python3
"""Reference encodings for the tokenizer conformance test (t/unit/tokenizer.c).

Runs Hugging Face `tokenizers` (the Rust library, not transformers) over the
corpus t/data/tok/corpus.json for each tokenizer.json given and writes
<out>/<name>.json with, for each corpus case (same order):

    ids        encode(text, add_special_tokens=False).ids
    ids_sp     encode(text, add_special_tokens=True).ids   (only if different)
    dec        decode(ids, skip_special_tokens=False)
    dec_skip   decode(ids, skip_special_tokens=True)      (only if different)
    dec_sp     decode(ids_sp, skip_special_tokens=False)  (only if ids_sp)

A string holding NUL is written as <key>_hex (UTF-8, hex) instead, since the
C side reads JSON strings as C strings.  Hex corpus cases (raw bytes, maybe
invalid UTF-8) are decoded with errors="replace" first, as the engine does.

Usage (on a machine with `pip install tokenizers`):
    python3 tools/tok_goldens.py build/tok/llama3/tokenizer.json \\
        build/tok/llama2/tokenizer.json \\
        models/localmoe-tiny/tokenizer.json --out t/data/tok
The name is the tokenizer.json's directory name, or NAME=PATH.
"""

import argparse
import json
import os
import sys

try:
    import tokenizers
    from tokenizers import Tokenizer
except ImportError:
    sys.exit("tok_goldens: the `tokenizers` package is required")


def corpus_texts(path):
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    out = []
    for c in cases:
        if "hex" in c:
            out.append(bytes.fromhex(c["hex"]).decode("utf-8", "replace"))
        else:
            out.append(c["text"])
    return out


def put(case, key, s):
    if "\x00" in s:
        case[key + "_hex"] = s.encode("utf-8").hex()
    else:
        case[key] = s


def goldens(name, path, texts):
    tok = Tokenizer.from_file(path)
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids_sp = tok.encode(text, add_special_tokens=True).ids
        case = {"ids": ids}
        if ids_sp != ids:
            case["ids_sp"] = ids_sp
        dec = tok.decode(ids, skip_special_tokens=False)
        put(case, "dec", dec)
        dec_skip = tok.decode(ids, skip_special_tokens=True)
        if dec_skip != dec:
            put(case, "dec_skip", dec_skip)
        if ids_sp != ids:
            put(case, "dec_sp", tok.decode(ids_sp, skip_special_tokens=False))
        cases.append(case)
    return {
        "tokenizer": name,
        "tokenizer_json_bytes": os.path.getsize(path),
        "tokenizers_version": tokenizers.__version__,
        "corpus_cases": len(texts),
        "cases": cases,
    }


def write(doc, path):
    # one case per line: small diffs, readable
    head = {k: v for k, v in doc.items() if k != "cases"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1])
        f.write(',\n "cases": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False,
                                               separators=(",", ":"))
                           for c in doc["cases"]))
        f.write("\n]}\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizers", nargs="+", metavar="[NAME=]PATH")
    ap.add_argument("--corpus",
                    default=os.path.join(here, "..", "t", "data", "tok",
                                         "corpus.json"))
    ap.add_argument("--out", default=os.path.join(here, "..", "t", "data",
                                                  "tok"))
    args = ap.parse_args()
    texts = corpus_texts(args.corpus)
    os.makedirs(args.out, exist_ok=True)
    for spec in args.tokenizers:
        if "=" in spec:
            name, path = spec.split("=", 1)
        else:
            path = spec
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        doc = goldens(name, path, texts)
        dst = os.path.join(args.out, name + ".json")
        write(doc, dst)
        print("%s: %d cases -> %s (tokenizers %s)"
              % (name, len(texts), dst, tokenizers.__version__))


if __name__ == "__main__":
    main()
