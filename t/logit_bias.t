#!/usr/bin/perl
# Runs build/t/logit_bias: logit_bias added by the backend (batch fields,
# logit_bias_device) gives the host sampler's tokens and logprobs, greedy
# and sampled, and keeps biased sequences off the host sampler.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/logit_bias";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
exec $bin or die "exec $bin: $!";
