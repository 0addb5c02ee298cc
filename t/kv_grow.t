#!/usr/bin/perl
# A KV pool that grows while sequences run (moe_backend_t.kv_grow).
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/kv_grow";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
