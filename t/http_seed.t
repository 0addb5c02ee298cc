#!/usr/bin/perl
# Sampling: temperature 1 with a seed is reproducible (same seed -> same
# text, stream or not; another seed -> different text), and top_k, top_p,
# min_p and the penalties are accepted and give valid output.
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

my $base = { model => $M, prompt => 'Write a poem about the sea:',
             max_tokens => 30, temperature => 1.0 };

sub gen {
    my (%o) = @_;
    my ($st, undef, $j) = http(POST => '/v1/completions', { %$base, %o });
    is($st, 200, 'sampling request ' . json_encode(\%o)) or diag explain $j;
    return $j->{choices}[0]{text} // '';
}

my $a = gen(seed => 1234);
my $b = gen(seed => 1234);
my $c = gen(seed => 1235);
ok(length $a, 'seed 1234: some text');
is($b, $a, 'seed 1234 twice: identical text');
isnt($c, $a, 'seed 1235: different text');

my $x = sse('/v1/completions', { %$base, seed => 1234, stream => $T });
is($x->text, $a, 'seed 1234 streamed: identical text');

my (undef, undef, $cj1) = http(POST => '/v1/chat/completions',
    { model => $M, max_tokens => 20, temperature => 1.0, seed => 7,
      messages => [{ role => 'user', content => 'Hi' }] });
my (undef, undef, $cj2) = http(POST => '/v1/chat/completions',
    { model => $M, max_tokens => 20, temperature => 1.0, seed => 7,
      messages => [{ role => 'user', content => 'Hi' }] });
is($cj2->{choices}[0]{message}{content}, $cj1->{choices}[0]{message}{content},
   'chat with seed 7 twice: identical');

# top_k 1 is greedy whatever the temperature
my $greedy = gen(temperature => 0);
is(gen(top_k => 1, seed => 99), $greedy, 'top_k 1 == greedy');

for my $o ({ top_k => 5 }, { top_p => 0.9 }, { min_p => 0.05 },
           { presence_penalty => 0.5 }, { frequency_penalty => 0.5 },
           { repetition_penalty => 1.2 },
           { top_k => 10, top_p => 0.8, min_p => 0.02,
             presence_penalty => -0.5, frequency_penalty => 1.0,
             repetition_penalty => 1.1 }) {
    my ($st, undef, $j) = http(POST => '/v1/completions',
        { %$base, %$o, seed => 42 });
    my $what = json_encode($o);
    is($st, 200, "$what: 200") or diag explain $j;
    ok(defined $j->{choices}[0]{text} && !ref $j->{choices}[0]{text},
       "$what: text is a string");
    like($j->{choices}[0]{finish_reason} // '', qr/^(length|stop)$/,
         "$what: finish_reason");
    cmp_ok($j->{usage}{completion_tokens} // 0, '>=', 1,
           "$what: at least one token");
    my (undef, undef, $j2) = http(POST => '/v1/completions',
        { %$base, %$o, seed => 42 });
    is($j2->{choices}[0]{text}, $j->{choices}[0]{text},
       "$what: reproducible with a seed");
}

# strong penalties change the greedy output of a repetitive model
my $pen = gen(temperature => 0, frequency_penalty => 2.0);
my $rep = gen(temperature => 0, repetition_penalty => 2.0);
ok($pen ne $greedy || $rep ne $greedy,
   'frequency/repetition penalty 2.0 changes the greedy text');

finish();
