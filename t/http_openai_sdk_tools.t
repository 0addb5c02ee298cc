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
use File::Copy qw(copy);
use LocalMoE::Test;

my $s = start_server(vllm => { max_model_len => 1024 });
my $root = root_dir();
my $sdk  = "$root/build/npm-sdk";

# install once (idempotent); a failing install fails the test, no skip
if (!-f "$sdk/node_modules/openai/package.json") {
    system('mkdir', '-p', $sdk) == 0 or die "mkdir $sdk";
    copy("$root/t/node/package.json", "$sdk/package.json")
        or die "copy package.json: $!";
    my $out = `npm install --prefix '$sdk' --no-audit --no-fund 2>&1`;
    my $rc = $? >> 8;
    is($rc, 0, 'npm install openai') or diag $out;
}
ok(-f "$sdk/node_modules/openai/package.json", 'openai SDK installed');
my ($ver) = slurp("$sdk/node_modules/openai/package.json")
    =~ /"version"\s*:\s*"([^"]+)"/;
diag("openai SDK $ver, " . `node --version`);

local $ENV{BASE_URL}  = $s->url . '/v1';
local $ENV{NODE_PATH} = "$sdk/node_modules";
my $pid = open my $fh, '-|';
defined $pid or die "fork: $!";
if (!$pid) {
    open STDERR, '>&', \*STDOUT;
    exec 'node', "$root/t/node/tools.test.mjs" or exit 127;
}
my ($planned, $seen) = (undef, 0);
while (my $l = <$fh>) {
    chomp $l;
    if ($l =~ /^(not )?ok \d+ - (.*)$/) {
        $seen++;
        ok(!$1, "sdk: $2");
    } elsif ($l =~ /^1\.\.(\d+)$/) {
        $planned = $1;
    } elsif ($l =~ /^# ?(.*)$/) {
        diag("  $1");
    } else {
        diag("node: $l");
    }
}
close $fh;
my $rc = $? >> 8;
is($rc, 0, 'node tools.test.mjs exits 0');
ok(defined $planned && $planned == $seen && $seen > 0,
   "node ran all its tests (" . ($planned // 'no plan') . " planned, $seen seen)");

finish();
