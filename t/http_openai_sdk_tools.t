#!/usr/bin/perl
# Tool calling through the official OpenAI Node SDK (npm `openai`, installed
# into build/npm-sdk) on the embedded model: runs t/node/tools.test.mjs
# (tool_choice required and named, arguments validated against the schema,
# streamed deltas reassembled, a role "tool" round trip, legacy functions,
# typed errors) and relays its TAP lines; the node process must exit 0 and
# have run every planned test.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LocalMoE::Test;

my $s = start_server(vllm => { max_model_len => 1024 });
node_sdk_run($s, 'tools.test.mjs');

finish();
