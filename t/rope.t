#!/usr/bin/perl
# Runs build/t/rope: RoPE scaling frequencies (linear, dynamic, yarn,
# llama3) against their formulas, and config.json errors.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/rope";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
