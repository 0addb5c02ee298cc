#!/usr/bin/perl
# The fp8 KV cache through nginx (vllm.kv_cache_dtype: fp8): the engine
# serves with it, /v1/stats/memory names the KV values' dtype (fp8_e4m3;
# float32 for the CPU backend's default cache) and the pool's size.  How
# close the fp8 cache's logits stay to the default's is t/kv_fp8.t's
# (relative L2 < 0.3 on this tiny model, whose flat logits let e4m3
# rounding change even the first greedy token).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LocalMoE::Test;

sub memory {
    my ($st, undef, $j) = http(GET => '/v1/stats/memory');
    is($st, 200, 'GET /v1/stats/memory');
    return ref $j eq 'HASH' ? $j : {};
}

# a greedy completion of 8 tokens: its usage.completion_tokens
sub greedy {
    my ($st, undef, $j) = http(POST => '/v1/completions', {
        model => model_id(), prompt => 'The quick brown fox', max_tokens => 8,
        temperature => 0, ignore_eos => JSON::PP::true });
    is($st, 200, 'a greedy completion answers 200');
    return ref $j eq 'HASH' ? $j->{usage}{completion_tokens} // 0 : 0;
}

my $s = start_server(engine => { kv_cache_blocks => 64 });
my $m = memory();
is($m->{kv_cache}{dtype}, 'float32', 'default: kv_cache.dtype float32 (CPU)')
    or diag explain $m;
my $bpb = $m->{kv_cache}{bytes_per_block};
is(greedy(), 8, 'default cache: 8 tokens generated');
stop_server($s);

$s = start_server(vllm => { kv_cache_dtype => 'fp8' },
                  engine => { kv_cache_blocks => 64 });
$m = memory();
is($m->{kv_cache}{dtype}, 'fp8_e4m3', 'kv_cache_dtype fp8: kv_cache.dtype '
   . 'fp8_e4m3') or diag explain $m;
is($m->{kv_cache}{blocks_total}, 64, 'the same 64 blocks');
# the CPU backend keeps the e4m3 values in fp32: the same bytes per block
is($m->{kv_cache}{bytes_per_block}, $bpb, 'CPU: the same bytes per block');
is(greedy(), 8, 'fp8 cache: 8 tokens generated');
finish();
