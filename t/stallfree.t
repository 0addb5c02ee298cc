#!/usr/bin/perl
# Runs build/t/stallfree: the step cost model and stall-free prefill
# sizing beside running decodes (pinned cost model: no timing involved).
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/stallfree";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
