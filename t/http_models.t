#!/usr/bin/perl
# The informational endpoints: GET /v1/models (OpenAI list shape), /health
# (JSON), /tokenize and /detokenize (vLLM shapes, round trip, special
# tokens), /metrics (Prometheus text with localmoe_ series), and
# /v1/stats/memory and /v1/stats/performance (JSON).
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $s = start_server();
my $F = JSON::PP::false;
my $T = JSON::PP::true;

# /v1/models
my ($st, $h, $j) = http(GET => '/v1/models');
is($st, 200, 'GET /v1/models: 200');
like($h->{'content-type'} // '', qr{^application/json}, 'models: JSON');
is($j->{object}, 'list', 'models: object list');
is(ref $j->{data}, 'ARRAY', 'models: data array');
is(scalar @{ $j->{data} // [] }, 1, 'models: one model');
my $m = $j->{data}[0] // {};
ok(defined $m->{id} && length $m->{id}, "models: id '" . ($m->{id} // '') . "'");
is($m->{object}, 'model', 'models: object model');
like($m->{created} // '', qr/^\d{9,}$/, 'models: created unix time');
ok(defined $m->{owned_by} && !ref $m->{owned_by}, 'models: owned_by');
is($m->{max_model_len}, 256, 'models: max_model_len from the YAML')
    if exists $m->{max_model_len};
(my $dirname = model_dir()) =~ s{/+\z}{};
$dirname =~ s{.*/}{};
is($m->{root}, $dirname, 'models: root is the model directory\'s name');
unlike($m->{root} // '/', qr{^/}, 'models: root is not an absolute path');

# /health
my ($hs, $hh, $hj) = http(GET => '/health');
is($hs, 200, 'GET /health: 200');
like($hh->{'content-type'} // '', qr{^application/json}, 'health: JSON');
is(ref $hj, 'HASH', 'health: a JSON object') or diag $hj;
is($hj->{running}, 0, 'health: running 0 when idle') or diag explain $hj;

# /tokenize and /detokenize
my $text = "Hello world, héllo 世界! 123\n\ttabs  and  spaces";
my $tk = tokenize($text, add_special_tokens => $F);
is(ref $tk->{tokens}, 'ARRAY', 'tokenize: tokens array');
is($tk->{count}, scalar @{ $tk->{tokens} }, 'tokenize: count == #tokens');
is($tk->{max_model_len}, 256, 'tokenize: max_model_len');
ok(!grep({ !/^\d+$/ } @{ $tk->{tokens} }), 'tokenize: integer ids');
my ($ds, undef, $dj) = http(POST => '/detokenize', { tokens => $tk->{tokens} });
is($ds, 200, 'detokenize: 200') or diag explain $dj;
is($dj->{prompt}, $text, 'detokenize(tokenize(x)) == x');

my $sp = tokenize('<|im_start|>user<|im_end|><|endoftext|>',
                  add_special_tokens => $F);
my $user = tokenize('user', add_special_tokens => $F)->{tokens};
my @id = map { tokenize($_, add_special_tokens => $F)->{tokens} }
         qw(<|im_start|> <|im_end|> <|endoftext|>);
is(scalar(grep { @$_ == 1 } @id), 3, 'tokenize: each special token is one id')
    or diag explain \@id;
is_deeply($sp->{tokens}, [ $id[0][0], @$user, $id[1][0], $id[2][0] ],
          'tokenize: special tokens split out of the text') or diag explain $sp;
my ($ds2, undef, $dj2) = http(POST => '/detokenize', { tokens => $sp->{tokens} });
is($dj2->{prompt}, '<|im_start|>user<|im_end|><|endoftext|>',
   'detokenize keeps special tokens');
my ($bs, undef, $bj) = http(POST => '/detokenize', { tokens => [999999999] });
is($bs, 400, 'detokenize: out of vocab id: 400');
ok(ref $bj eq 'HASH' && ref $bj->{error} eq 'HASH', 'detokenize: error body');
my ($ts, undef, $tj) = http(POST => '/tokenize', { prompt => 42 });
is($ts, 400, 'tokenize: prompt not a string: 400');

# /metrics
my ($ms, $mh, undef, $metrics) = http(GET => '/metrics');
is($ms, 200, 'GET /metrics: 200');
like($mh->{'content-type'} // '', qr{^text/plain}, 'metrics: text/plain');
my @series = grep { /^localmoe_/ } split /\n/, $metrics;
ok(@series >= 3, scalar(@series) . ' localmoe_ series');
my @bad = grep {
    !/^localmoe_[a-zA-Z0-9_:]*(\{[^}]*\})? (-?[0-9.eE+-]+|NaN|[+-]Inf)( -?\d+)?$/
} @series;
is_deeply(\@bad, [], 'metrics: every localmoe_ line is "name{labels} value"');
my @other = grep { length && !/^#/ && !/^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? \S+/ }
            split /\n/, $metrics;
is_deeply(\@other, [], 'metrics: only comments and samples');
like($metrics, qr/^# TYPE localmoe_\S+ (counter|gauge|histogram|summary)$/m,
     'metrics: TYPE lines');

# /v1/stats/*
my ($ss, $sh, $sj) = http(GET => '/v1/stats/memory');
is($ss, 200, 'GET /v1/stats/memory: 200');
like($sh->{'content-type'} // '', qr{^application/json}, 'stats/memory: JSON');
is(ref $sj, 'HASH', 'stats/memory: object') or diag $sj;
is(ref $sj->{kv_cache}, 'HASH', 'stats/memory: kv_cache object')
    or diag explain $sj;
like($sj->{kv_cache}{blocks_used} // '', qr/^\d+$/, 'kv_cache.blocks_used');
like($sj->{kv_cache}{blocks_total} // '', qr/^[1-9]\d*$/, 'kv_cache.blocks_total');
my ($ps, $ph, $pj) = http(GET => '/v1/stats/performance');
is($ps, 200, 'GET /v1/stats/performance: 200');
like($ph->{'content-type'} // '', qr{^application/json}, 'stats/performance: JSON');
is(ref $pj, 'HASH', 'stats/performance: object') or diag $pj;

# counters move: one request later the generated token counter grew
my ($st0, undef, undef, $before) = http(GET => '/metrics');
http(POST => '/v1/completions', { model => $m->{id}, prompt => 'count me',
                                  max_tokens => 3, temperature => 0 });
my ($st1, undef, undef, $after) = http(GET => '/metrics');
isnt($after, $before, 'metrics change after a request');

# a sampled request is drawn by the backend (CPU here, the GPU with cuda):
# backend_sampled_tokens_total grows by its tokens
sub sampled_total {
    my ($t) = @_;
    return $t =~ /^localmoe_backend_sampled_tokens_total(?:\{[^}]*\})? (\d+)/m
           ? $1 : undef;
}
my $bs0 = sampled_total($after);
my ($cs, undef, $cj) = http(POST => '/v1/completions',
    { model => $m->{id}, prompt => 'sample me', max_tokens => 4,
      temperature => 0.9, top_p => 0.9, seed => 3, ignore_eos => JSON::PP::true });
is($cs, 200, 'sampled completion: 200');
my (undef, undef, undef, $after2) = http(GET => '/metrics');
ok(defined $bs0 && defined sampled_total($after2)
   && sampled_total($after2) - $bs0 == ($cj->{usage}{completion_tokens} // -1),
   'backend_sampled_tokens_total grows by the sampled completion\'s tokens ('
   . ($bs0 // 'undef') . ' -> ' . (sampled_total($after2) // 'undef') . ')');

finish();
