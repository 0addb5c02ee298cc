#!/usr/bin/perl
# The weight hand-over protocol (engine/backends/share.c) without a GPU.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/share";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
