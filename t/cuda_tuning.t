#!/usr/bin/perl
# The CUDA tuning record: defaults, MOE_CUDA_* overrides, bad values refused.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/cuda_tuning";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
