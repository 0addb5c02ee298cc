#!/usr/bin/perl
# Runs build/t/logprobs: logprobs of the host sampler and the engine (token
# records, prompt logprobs) against a direct log-softmax of CPU logits.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/logprobs";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
