#!/usr/bin/perl
# Swap space below the scheduler: CPU backend swap_out / swap_in round trip and slot manager.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/swap";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
