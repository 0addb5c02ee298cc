#!/bin/sh
# Build the training corpus of the embedded default model (models/localmoe-kjv):
# the King James Bible, one verse per line, verse references stripped,
# punctuation kept, in canonical order (Genesis 1:1 .. Revelation 22:21).
#
# Source: the Debian packages bible-kjv-text (the compressed text,
# /usr/lib/bible.data) and bible-kjv (the `bible` reader).  The KJV text is in
# the public domain; see /usr/share/doc/bible-kjv-text/copyright.
#
# Usage: tools/prepare_corpus.sh [OUTDIR]      (default: build/corpus)
# Writes OUTDIR/kjv.txt.  tools/train_default.py holds out the validation
# verses itself (blocks of 50 consecutive verses, one block in 50: ~2%).
#
# Offline apart from apt (Debian mirror); installs the packages when missing
# (needs root or sudo).

set -eu

OUTDIR=${1:-build/corpus}
OUT="$OUTDIR/kjv.txt"
NVERSES=31102          # verses in the KJV (Protestant canon, 66 books)

die() { echo "prepare_corpus: $*" >&2; exit 1; }

if ! command -v bible >/dev/null 2>&1 || [ ! -r /usr/lib/bible.data ]; then
    echo "prepare_corpus: installing bible-kjv bible-kjv-text" >&2
    SUDO=
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y bible-kjv bible-kjv-text >/dev/null \
        || { $SUDO apt-get update >/dev/null \
             && $SUDO apt-get install -y bible-kjv bible-kjv-text >/dev/null; } \
        || die "cannot install bible-kjv bible-kjv-text"
fi
command -v bible >/dev/null 2>&1 || die "the 'bible' program is missing"

mkdir -p "$OUTDIR"
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP" "$TMP.raw"' EXIT

# -f: no pretty-printing, so one line per verse, each "Ref text", e.g.
# "Ge1:1 In the beginning God created the heaven and the earth."
# The range covers the whole book; stdin is closed so bible never prompts.
bible -f 'gen1:1-rev22:21' </dev/null >"$TMP.raw" \
    || die "bible failed to dump the text"

n=$(wc -l <"$TMP.raw")
[ "$n" -eq "$NVERSES" ] || die "expected $NVERSES verses, got $n"
bad=$(LC_ALL=C grep -cv '^[1-3]\{0,1\}[A-Za-z]\{1,\}[0-9]\{1,\}:[0-9]\{1,\} ' \
      "$TMP.raw" || true)
[ "$bad" -eq 0 ] || die "$bad lines without a verse reference"

# strip the reference, squeeze runs of blanks, trim the ends
LC_ALL=C sed -e 's/^[1-3]\{0,1\}[A-Za-z]\{1,\}[0-9]\{1,\}:[0-9]\{1,\} //' \
    -e 's/[[:space:]]\{1,\}/ /g' -e 's/^ //' -e 's/ $//' "$TMP.raw" >"$TMP"

empty=$(grep -c '^$' "$TMP" || true)
[ "$empty" -eq 0 ] || die "$empty empty verses"
nonascii=$(LC_ALL=C grep -c '[^ -~]' "$TMP" || true)
[ "$nonascii" -eq 0 ] || die "$nonascii verses with non-ASCII bytes"
head -n 1 "$TMP" | grep -qx 'In the beginning God created the heaven and the earth.' \
    || die "first verse is not Genesis 1:1"

mv "$TMP" "$OUT"
rm -f "$TMP.raw"
trap - EXIT

bytes=$(wc -c <"$OUT")
words=$(wc -w <"$OUT")
# the hold-out rule of train_default.py: verse i is validation when
# (i / 50) % 50 == 25 (0-based i, integer division)
nval=$(awk 'int((NR - 1) / 50) % 50 == 25' "$OUT" | wc -l)
vbytes=$(awk 'int((NR - 1) / 50) % 50 == 25' "$OUT" | wc -c)
echo "prepare_corpus: $OUT: $NVERSES verses, $words words, $bytes bytes"
echo "prepare_corpus: validation hold-out: $nval verses, $vbytes bytes" \
     "(blocks of 50 verses, 1 in 50)"
echo "prepare_corpus: licence: KJV text public domain" \
     "(/usr/share/doc/bible-kjv-text/copyright)"
