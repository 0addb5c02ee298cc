#!/usr/bin/perl
# safetensors reader: valid files, shards, dtype conversion, malformed files.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/safetensors";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
chdir "$FindBin::Bin/.." or die "chdir: $!";
exec $bin or die "exec $bin: $!";
