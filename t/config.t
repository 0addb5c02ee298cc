#!/usr/bin/perl
# The YAML config loader: conf/localmoe.yaml, the seed's configs, and bad files failing at file:line with a reason.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/config";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
