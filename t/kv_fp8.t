#!/usr/bin/perl
# The fp8 KV cache option: the YAML key, the CPU backend's e4m3 rounding.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/kv_fp8";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
