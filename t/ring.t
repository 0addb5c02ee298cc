#!/usr/bin/perl
# The lock-free SPSC ring: single-thread semantics and a 5M-message two-thread stress run.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/ring";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
