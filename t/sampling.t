#!/usr/bin/perl
# Runs build/t/sampling: host sampler (greedy, temperature, top-k/p, min-p,
# penalties, seeds) and KV block manager.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/sampling";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
