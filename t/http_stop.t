#!/usr/bin/perl
# Stop strings and stop_token_ids: a stop string S taken from the greedy
# output (spanning a token boundary) cuts the text right before the first
# occurrence of S, finish_reason "stop", S not included, for non-stream and
# stream; a stop_token_ids entry that occurs in the greedy output ends the
# generation there.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my $T = JSON::PP::true;
my $F = JSON::PP::false;

my @prompts = ('The capital of France is', 'def fibonacci(n):',
               'In the beginning', 'Roses are red, violets are');
my ($prompt, $text, @deltas, $S, $cut);

PROMPT: for my $p (@prompts) {
    my $req = { model => $M, prompt => $p, max_tokens => 40,
                temperature => 0 };
    my ($st, undef, $j) = http(POST => '/v1/completions', $req);
    is($st, 200, "greedy 40 tokens for '$p'") or next;
    my $x = sse('/v1/completions', { %$req, stream => $T });
    my @d = map { $_->{choices}[0]{text} // '' } $x->chunks;
    my $t = $j->{choices}[0]{text};
    next unless $x->text eq $t;      # checked in http_stream.t
    # a boundary after delta k: S = last 2 chars of the text so far + the
    # first 2 of the next delta; its first occurrence must start at >= 3
    my $pos = 0;
    for my $k (0 .. $#d - 1) {
        $pos += length $d[$k];
        next unless length $d[$k + 1] && $pos >= 5;
        my $cand = substr($t, $pos - 2, 2) . substr($d[$k + 1], 0, 2);
        next if $cand =~ /\x{FFFD}/ || $cand =~ /^\s*$/;
        my $i = index $t, $cand;
        next unless $i >= 3;
        ($prompt, $text, @deltas) = ($p, $t, @d);
        ($S, $cut) = ($cand, $i);
        last PROMPT;
    }
}
ok(defined $S, 'found a stop string spanning a token boundary')
    or do { finish(); exit };
diag("text: " . json_encode($text) . "\nstop: " . json_encode($S)
     . " at $cut");
my $want = substr $text, 0, $cut;

my $req = { model => $M, prompt => $prompt, max_tokens => 40,
            temperature => 0, stop => [$S] };
my ($st, undef, $j) = http(POST => '/v1/completions', $req);
is($st, 200, 'stop: 200') or diag explain $j;
is($j->{choices}[0]{text}, $want, 'stop: text is the prefix before S');
is($j->{choices}[0]{finish_reason}, 'stop', 'stop: finish_reason stop');
unlike($j->{choices}[0]{text} // '', qr/\Q$S\E/, 'stop: S not in the text');
cmp_ok($j->{usage}{completion_tokens} // 99, '<', 40,
       'stop: fewer tokens generated than max_tokens');

# a stop string given as a plain string (not a list) works the same
my ($st1, undef, $j1) = http(POST => '/v1/completions', { %$req, stop => $S });
is($j1->{choices}[0]{text}, $want, 'stop as a string: same text');

# several stops: the earliest match wins
my ($st1b, undef, $j1b) = http(POST => '/v1/completions',
    { %$req, stop => ['@@never@@', $S, "\x{1F600}zz"] });
is($j1b->{choices}[0]{text}, $want, 'stop among several: same text');

my $x = sse('/v1/completions', { %$req, stream => $T });
is_deeply([ $x->errors ], [], 'stop stream: clean framing');
ok($x->done, 'stop stream: ends with [DONE]');
is($x->text, $want, 'stop stream: concatenated text is the prefix before S');
is($x->finish_reason, 'stop', 'stop stream: finish_reason stop');

# chat, streamed: the same rule on the assistant's text
my $creq = { model => $M, max_tokens => 40, temperature => 0,
             messages => [{ role => 'user', content => $prompt }] };
my (undef, undef, $cj) = http(POST => '/v1/chat/completions', $creq);
my $ct = $cj->{choices}[0]{message}{content} // '';
my ($cS) = grep { index($ct, $_) >= 3 }
    map { substr $ct, $_, 3 } grep { substr($ct, $_, 3) !~ /\x{FFFD}|^\s*$/ }
    5 .. length($ct) - 3;
SKIP: {
    skip 'chat output too short for a stop string', 3 unless defined $cS;
    my $cwant = substr $ct, 0, index($ct, $cS);
    my $cx = sse('/v1/chat/completions',
                 { %$creq, stop => [$cS], stream => $T });
    ok($cx->done, 'chat stop stream: [DONE]');
    is($cx->text, $cwant, 'chat stop stream: text before the stop string');
    is($cx->finish_reason, 'stop', 'chat stop stream: finish_reason stop');
}

# stop_token_ids: a delta that is exactly one token (ASCII, no earlier
# occurrence) -> its id; generation stops there, the token not emitted
my ($sid, $k);
for my $i (2 .. $#deltas) {
    my $d = $deltas[$i];
    next unless length $d && $d =~ /\A[\x20-\x7e]+\z/;
    next if grep { $_ eq $d } @deltas[0 .. $i - 1];
    my $tk = tokenize($d, add_special_tokens => $F);
    next unless @{ $tk->{tokens} } == 1;
    ($sid, $k) = ($tk->{tokens}[0], $i);
    last;
}
SKIP: {
    skip 'no single-token ASCII delta in the greedy output', 4
        unless defined $sid;
    my $swant = join '', @deltas[0 .. $k - 1];
    diag("stop_token_ids [$sid] (" . json_encode($deltas[$k]) . ") at delta $k");
    my ($st2, undef, $j2) = http(POST => '/v1/completions',
        { model => $M, prompt => $prompt, max_tokens => 40,
          temperature => 0, stop_token_ids => [$sid] });
    is($st2, 200, 'stop_token_ids: 200') or diag explain $j2;
    is($j2->{choices}[0]{text}, $swant,
       'stop_token_ids: text ends before that token');
    is($j2->{choices}[0]{finish_reason}, 'stop',
       'stop_token_ids: finish_reason stop');
    cmp_ok($j2->{usage}{completion_tokens} // 99, '<', 40,
           'stop_token_ids: stopped early');
}

finish();
