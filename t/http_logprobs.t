#!/usr/bin/perl
# logprobs end to end on the CPU backend: chat logprobs + top_logprobs and
# completions logprobs (0-5) have OpenAI's shapes, streamed and not; the
# chosen token's logprob is <= 0, the top entries are sorted, exp() of
# them sums to <= 1, and at temperature 0 the chosen token is the first
# top entry with the same logprob (greedy picks the most likely); the
# streamed entries equal the non-streamed ones (same greedy tokens); the
# chat entries' bytes are the UTF-8 of their token; echo puts the prompt
# before the completion, and with logprobs its first token's logprob is
# null and the rest are numbers.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use List::Util qw(sum);
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my $T = JSON::PP::true;
my $C = '/v1/chat/completions';
my $P = '/v1/completions';
my %chat = (model => $M, messages => [{ role => 'user',
            content => 'Say something' }], max_tokens => 6,
            temperature => 0, ignore_eos => $T);
my %cmp = (model => $M, prompt => 'The quick brown fox', max_tokens => 6,
           temperature => 0, ignore_eos => $T);

sub sorted_desc {
    my @v = @_;
    for my $i (1 .. $#v) { return 0 if $v[$i] > $v[$i - 1] + 1e-6 }
    return 1;
}

# --- chat, not streamed -------------------------------------------------
my ($st, undef, $j, $raw) = http(POST => $C,
    { %chat, logprobs => $T, top_logprobs => 5 });
is($st, 200, 'chat logprobs: 200') or diag substr($raw, 0, 300);
my $lp = $j->{choices}[0]{logprobs};
ok(ref $lp eq 'HASH' && ref $lp->{content} eq 'ARRAY',
   'chat: logprobs.content is an array');
my @content = @{ $lp->{content} // [] };
is(scalar @content, 6, 'chat: one entry per generated token');
my $joined = join '', map { $_->{token} } @content;
is($joined, $j->{choices}[0]{message}{content},
   'chat: the entries\' tokens spell the content');
for my $i (0 .. $#content) {
    my $e = $content[$i];
    my @top = @{ $e->{top_logprobs} // [] };
    ok(defined $e->{logprob} && $e->{logprob} <= 0,
       "chat token $i: logprob <= 0 ($e->{logprob})");
    is(scalar @top, 5, "chat token $i: 5 top entries");
    ok(sorted_desc(map { $_->{logprob} } @top),
       "chat token $i: top entries sorted");
    my $mass = sum(map { exp $_->{logprob} } @top);
    ok($mass <= 1 + 1e-5, "chat token $i: exp sum of top <= 1 ($mass)");
    is($top[0]{token}, $e->{token}, "chat token $i: greedy = first top");
    ok(abs($top[0]{logprob} - $e->{logprob}) < 1e-5,
       "chat token $i: same logprob as its top entry");
    is_deeply($e->{bytes}, [unpack 'C*', do { my $b = $e->{token};
              utf8::encode($b); $b }], "chat token $i: bytes of the token");
    ok(ref $top[0]{bytes} eq 'ARRAY', "chat token $i: top entries have bytes");
}

# top_logprobs 0: entries without top
($st, undef, $j) = http(POST => $C, { %chat, logprobs => $T });
is($st, 200, 'chat logprobs, no top_logprobs: 200');
is_deeply([map { scalar @{ $_->{top_logprobs} } }
           @{ $j->{choices}[0]{logprobs}{content} }], [(0) x 6],
          'chat: top_logprobs [] without top_logprobs');
($st, undef, $j) = http(POST => $C, { %chat });
ok(exists $j->{choices}[0]{logprobs}
   && !defined $j->{choices}[0]{logprobs}, 'chat: logprobs null when off');

# --- chat, streamed -----------------------------------------------------
my $sse = sse($C, { %chat, logprobs => $T, top_logprobs => 3,
                    stream => $T });
ok($sse->done, 'chat stream: ends with [DONE]');
my @sc;
for my $c ($sse->chunks) {
    my $l = $c->{choices}[0]{logprobs};
    push @sc, @{ $l->{content} } if ref $l eq 'HASH';
}
is(scalar @sc, 6, 'chat stream: 6 entries over the chunks');
is(join('', map { $_->{token} } @sc), $sse->text,
   'chat stream: entries spell the streamed text');
is_deeply([map { $_->{token} } @sc], [map { $_->{token} } @content],
          'chat stream: same tokens as not streamed');
ok(!grep({ abs($sc[$_]{logprob} - $content[$_]{logprob}) > 1e-4 } 0 .. 5),
   'chat stream: same logprobs as not streamed');
is(scalar @{ $sc[0]{top_logprobs} }, 3, 'chat stream: 3 top entries');

# --- completions ----------------------------------------------------------
($st, undef, $j, $raw) = http(POST => $P, { %cmp, logprobs => 3 });
is($st, 200, 'completions logprobs: 200') or diag substr($raw, 0, 300);
$lp = $j->{choices}[0]{logprobs};
for my $k (qw(tokens token_logprobs top_logprobs text_offset)) {
    ok(ref $lp->{$k} eq 'ARRAY' && @{ $lp->{$k} } == 6,
       "completions: $k has 6 entries");
}
is(join('', @{ $lp->{tokens} }), $j->{choices}[0]{text},
   'completions: tokens spell the text');
my $off = 0;
my @want_off = map { my $o = $off; $off += length $_; $o } @{ $lp->{tokens} };
is_deeply($lp->{text_offset}, \@want_off, 'completions: text_offset');
for my $i (0 .. 5) {
    my $d = $lp->{top_logprobs}[$i];
    ok(ref $d eq 'HASH' && keys %$d >= 1 && keys %$d <= 3,
       "completions token $i: top_logprobs a dict of <= 3");
    my $mass = sum(map { exp } values %$d);
    ok($mass <= 1 + 1e-5, "completions token $i: exp sum <= 1");
    ok($lp->{token_logprobs}[$i] <= 0, "completions token $i: logprob <= 0");
}

# streamed completions carry the same
$sse = sse($P, { %cmp, logprobs => 2, stream => $T });
my @stoks;
for my $c ($sse->chunks) {
    my $l = $c->{choices}[0]{logprobs};
    push @stoks, @{ $l->{tokens} } if ref $l eq 'HASH';
}
is_deeply(\@stoks, $lp->{tokens}, 'completions stream: same tokens');

# --- echo -------------------------------------------------------------------
($st, undef, $j) = http(POST => $P, { %cmp, echo => $T });
is($st, 200, 'echo: 200');
my ($plain) = do { my (undef, undef, $x) = http(POST => $P, { %cmp }); $x };
is($j->{choices}[0]{text}, $cmp{prompt} . $plain->{choices}[0]{text},
   'echo: the prompt then the completion');

($st, undef, $j) = http(POST => $P, { %cmp, echo => $T, logprobs => 1 });
is($st, 200, 'echo + logprobs: 200');
$lp = $j->{choices}[0]{logprobs};
my $np = $j->{usage}{prompt_tokens};
is(scalar @{ $lp->{tokens} }, $np + 6, 'echo + logprobs: prompt + 6 tokens');
ok(!defined $lp->{token_logprobs}[0] && !defined $lp->{top_logprobs}[0],
   'echo + logprobs: the first prompt token has null logprob');
ok(!grep({ !defined $_ || $_ > 0 } @{ $lp->{token_logprobs} }[1 .. $np]),
   'echo + logprobs: the other prompt tokens have logprobs <= 0');
my (undef, undef, $nolp) = http(POST => $P, { %cmp, logprobs => 1 });
my @want = @{ $nolp->{choices}[0]{logprobs}{token_logprobs} };
my @got = @{ $lp->{token_logprobs} }[$np .. $np + 5];
ok(!grep({ abs($got[$_] - $want[$_]) > 1e-4 } 0 .. 5),
   'echo + logprobs: the completion part equals the one without echo');
is($j->{choices}[0]{text}, $cmp{prompt} . $plain->{choices}[0]{text},
   'echo + logprobs: text is prompt + completion');

$sse = sse($P, { %cmp, echo => $T, logprobs => 1, stream => $T });
is($sse->text, $cmp{prompt} . $plain->{choices}[0]{text},
   'echo + logprobs streamed: prompt + completion text');

finish();
