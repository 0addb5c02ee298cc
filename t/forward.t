#!/usr/bin/perl
# Model loader + fp32 CPU forward: self-consistency and transformers' reference logits.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/forward";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
chdir "$FindBin::Bin/.." or die "chdir: $!";
exec $bin or die "exec $bin: $!";
