#!/usr/bin/perl
# Jinja-subset chat-template interpreter: cases, goldens, errors, fuzz.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/jinja";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
