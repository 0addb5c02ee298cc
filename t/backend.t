#!/usr/bin/perl
# The backend factory: backend choice, KV and swap sizing, rank placement (CPU).
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/backend";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
