#!/usr/bin/perl
# The prefix affinity key behind $moe_prefix_key (engine/text/prefix_key.c):
# stable across the turns of a conversation, different across
# conversations, indifferent to JSON spelling, bounded by its budget, the
# same fed whole or in pieces, and absent (never an error) for bodies that
# are not JSON or have no messages/prompt.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/prefix_key";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
