#!/usr/bin/perl
# n > 1 and best_of end to end on the CPU backend: n = 2 greedy gives two
# choices (index 0 and 1) with the same text, on chat and completions,
# streamed (chunks of both indexes interleaved, a finish_reason per index)
# and not; usage counts the prompt once and the completion tokens of every
# choice; seeded sampling: choice i equals the request alone with seed + i;
# best_of 3 with n 1 returns one choice, the one of the three with the
# highest cumulative logprob (checked against the three run alone with
# logprobs), and usage counts all three; a stop string ends one choice
# without ending the others' text; the engine's KV blocks are all free
# afterwards (stats); a client that disconnects from a streamed n=3
# request gets all three choices cancelled (blocks free, nothing running).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use List::Util qw(sum);
use LocalMoE::Test;

my $s = start_server(vllm => { max_model_len => 2048 });
my $M = model_id();
my $T = JSON::PP::true;
my $C = '/v1/chat/completions';
my $P = '/v1/completions';
my %chat = (model => $M, messages => [{ role => 'user', content => 'Hi' }],
            max_tokens => 5, temperature => 0, ignore_eos => $T);
my %cmp = (model => $M, prompt => 'Once upon a time', max_tokens => 5,
           temperature => 0, ignore_eos => $T);

# --- greedy n = 2 -------------------------------------------------------
my ($st, undef, $j, $raw) = http(POST => $C, { %chat, n => 2 });
is($st, 200, 'chat n=2: 200') or diag substr($raw, 0, 300);
my @ch = @{ $j->{choices} // [] };
is(scalar @ch, 2, 'chat n=2: two choices');
is_deeply([map { $_->{index} } @ch], [0, 1], 'chat n=2: indexes 0, 1');
is($ch[0]{message}{content}, $ch[1]{message}{content},
   'chat n=2 greedy: equal texts');
my ($st1, undef, $one) = http(POST => $C, { %chat });
is($ch[0]{message}{content}, $one->{choices}[0]{message}{content},
   'chat n=2 greedy: equal to n=1');
is($j->{usage}{prompt_tokens}, $one->{usage}{prompt_tokens},
   'usage: the prompt counted once');
is($j->{usage}{completion_tokens}, 2 * $one->{usage}{completion_tokens},
   'usage: completion tokens of both choices');

($st, undef, $j) = http(POST => $P, { %cmp, n => 2 });
is($st, 200, 'completions n=2: 200');
is(scalar @{ $j->{choices} }, 2, 'completions n=2: two choices');
is($j->{choices}[0]{text}, $j->{choices}[1]{text},
   'completions n=2 greedy: equal texts');

# --- streamed -----------------------------------------------------------
my $sse = sse($C, { %chat, n => 2, stream => $T,
                    stream_options => { include_usage => $T } });
ok($sse->done, 'chat n=2 stream: [DONE]');
my (%text, %fin, @order);
for my $c ($sse->chunks) {
    for my $x (@{ $c->{choices} // [] }) {
        push @order, $x->{index};
        $text{ $x->{index} } .= $x->{delta}{content} // '';
        $fin{ $x->{index} } = $x->{finish_reason} if $x->{finish_reason};
    }
    $j = $c if $c->{usage};
}
is_deeply([sort keys %text], [0, 1], 'chat stream: chunks of index 0 and 1');
is($text{0}, $ch[0]{message}{content}, 'chat stream: index 0 text');
is($text{1}, $ch[1]{message}{content}, 'chat stream: index 1 text');
is_deeply(\%fin, { 0 => 'length', 1 => 'length' },
          'chat stream: a finish_reason per index');
is($j->{usage}{completion_tokens}, 2 * $one->{usage}{completion_tokens},
   'chat stream: usage counts both choices');

# --- seeded: choice i == alone with seed + i ------------------------------
my %smp = (%cmp, temperature => 1, max_tokens => 8);
($st, undef, $j) = http(POST => $P, { %smp, n => 3, seed => 77 });
is($st, 200, 'seeded n=3: 200');
for my $i (0 .. 2) {
    my (undef, undef, $a) = http(POST => $P, { %smp, seed => 77 + $i });
    is($j->{choices}[$i]{text}, $a->{choices}[0]{text},
       "seeded n=3: choice $i == alone with seed " . (77 + $i));
}

# --- best_of -----------------------------------------------------------------
($st, undef, $j, $raw) = http(POST => $P,
    { %smp, n => 1, best_of => 3, seed => 5 });
is($st, 200, 'best_of 3: 200') or diag substr($raw, 0, 300);
is(scalar @{ $j->{choices} }, 1, 'best_of 3, n 1: one choice');
my (@cum, @texts, $ntok);
for my $i (0 .. 2) {
    my (undef, undef, $a) = http(POST => $P,
        { %smp, seed => 5 + $i, logprobs => 0 });
    push @texts, $a->{choices}[0]{text};
    push @cum, sum(@{ $a->{choices}[0]{logprobs}{token_logprobs} });
    $ntok += $a->{usage}{completion_tokens};
}
my ($best) = sort { $cum[$b] <=> $cum[$a] || $a <=> $b } 0 .. 2;
is($j->{choices}[0]{text}, $texts[$best],
   "best_of 3: the choice with the highest cumulative logprob ($best)");
is($j->{usage}{completion_tokens}, $ntok,
   'best_of 3: usage counts every choice');

# --- stop string per choice ---------------------------------------------------
($st, undef, $j) = http(POST => $P, { %cmp, n => 2, max_tokens => 12 });
my $full = $j->{choices}[0]{text};
SKIP: {
    skip 'no stop string to pick', 3 unless length($full) > 4;
    my $stop = substr($full, 2, 2);
    ($st, undef, $j) = http(POST => $P,
        { %cmp, n => 2, max_tokens => 12, stop => [$stop] });
    is($st, 200, 'n=2 with a stop string: 200');
    is_deeply([map { $_->{finish_reason} } @{ $j->{choices} }],
              ['stop', 'stop'], 'n=2 stop: each choice stopped');
    is($j->{choices}[1]{text}, substr($full, 0, index($full, $stop)),
       'n=2 stop: text before the stop string');
}

# --- blocks all free ----------------------------------------------------------
# (the engine publishes its stats after its step: poll, a hang guard)
my ($mem, $used);
for (1 .. 100) {
    (undef, undef, $mem) = http(GET => '/v1/stats/memory');
    $used = ref $mem eq 'HASH' ? $mem->{kv_cache}{blocks_used} : undef;
    last if defined $used && $used == 0;
    select(undef, undef, undef, 0.1);
}
ok(defined $used && $used == 0, 'KV blocks all free afterwards')
    or diag json_encode($mem);

# --- disconnect cancels every choice -------------------------------------------
{
    my $cancelled = sub {
        my (undef, undef, undef, $m) = http(GET => '/metrics');
        my ($v) = $m =~ /^localmoe_\w*cancel\w*_total\S* (\S+)/m;
        return $v // 0;
    };
    my $c0 = $cancelled->();
    my $st = sse_open($C, { %chat, n => 3, max_tokens => 1900,
                            stream => $T });
    ok($st->read_events(4, 30) >= 4, 'n=3 stream: events arrive');
    $st->close;
    my ($h, $m2);
    for (1 .. 300) {            # a hang guard, not a speed limit
        (undef, undef, $h) = http(GET => '/health');
        (undef, undef, $m2) = http(GET => '/v1/stats/memory');
        last if ref $h eq 'HASH' && ($h->{running} // -1) == 0
             && ($m2->{kv_cache}{blocks_used} // -1) == 0;
        select(undef, undef, undef, 0.1);
    }
    is($h->{running}, 0, 'disconnect: no choice left running');
    is($m2->{kv_cache}{blocks_used}, 0, 'disconnect: every block free');
    is($cancelled->() - $c0, 1,
       'disconnect: the request counted cancelled once (its 3 choices '
       . 'cut short, not run to 1900 tokens)');
}

finish();
