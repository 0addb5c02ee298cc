#!/usr/bin/perl
# Prefix caching over HTTP: the same prompt twice reuses the KV blocks of
# its full prefix (usage.prompt_tokens_details.cached_tokens), gives the
# same greedy text, and with enable_prefix_caching false nothing is reused.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $prompt = "The quick brown fox jumps over the lazy dog. " x 6;

for my $on (1, 0) {
    my $s = start_server(vllm => { enable_prefix_caching =>
                                   $on ? 'true' : 'false' });
    my $M = model_id();
    my $req = { model => $M, prompt => $prompt, max_tokens => 8,
                temperature => 0 };
    my ($st1, undef, $a) = http(POST => '/v1/completions', $req);
    my ($st2, undef, $b) = http(POST => '/v1/completions', $req);
    is("$st1 $st2", '200 200', "caching $on: both requests 200");
    my $n  = $a->{usage}{prompt_tokens};
    my $c1 = $a->{usage}{prompt_tokens_details}{cached_tokens};
    my $c2 = $b->{usage}{prompt_tokens_details}{cached_tokens};
    is($c1, 0, "caching $on: first request has nothing cached");
    if ($on) {
        # whole 16-token blocks before the last prompt token
        is($c2, int(($n - 1) / 16) * 16,
           "second request reuses the full blocks ($c2 of $n tokens)");
    } else {
        is($c2, 0, 'caching off: nothing reused');
    }
    is($b->{choices}[0]{text}, $a->{choices}[0]{text}, "caching $on: same text");
    stop_server($s);
}

finish();
