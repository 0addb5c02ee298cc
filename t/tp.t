#!/usr/bin/perl
# Tensor parallelism on the CPU: sharded ranks with all-reduced partial sums equal the unsharded backend (build/t/tp).
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/tp";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
