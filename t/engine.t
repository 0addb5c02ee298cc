#!/usr/bin/perl
# Runs build/t/engine: continuous batching, preemption, cancel, seeds on the
# tiny default model without nginx.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/engine";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
