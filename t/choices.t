#!/usr/bin/perl
# Runs build/t/choices: n > 1 choices forked after the prefill, sharing the
# prompt's KV blocks, seeds per choice, cancels.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/choices";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
