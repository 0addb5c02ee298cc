#!/usr/bin/perl
# The official OpenAI Node SDK (npm `openai`, installed into build/npm-sdk)
# works against LocalMoE: runs t/node/sdk.test.mjs (streamed chat, chat,
# completions, typed errors) and relays its TAP lines; the node process must
# exit 0 and have run every planned test.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LocalMoE::Test;

my $s = start_server();
node_sdk_run($s, 'sdk.test.mjs');

finish();
