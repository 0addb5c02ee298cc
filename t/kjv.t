#!/usr/bin/perl
# Runs build/t/kjv: the embedded default model (models/localmoe-kjv) against
# the transformers reference saved when it was trained.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/kjv";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
