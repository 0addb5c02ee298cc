#!/usr/bin/perl
# Continuous batching is exact: 32 concurrent greedy streams (different
# prompts) all finish with [DONE], and each one's text equals the same
# request run alone, non-streamed.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use Time::HiRes qw(time);
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my $N = 32;
my @words = qw(apple river mountain engine quantum violet harbor lantern
               crystal thunder meadow silver falcon garden orbit pepper);
my @prompts;     # different words and lengths
for my $i (0 .. $N - 1) {
    my @w = map { $words[($i * 7 + $_ * 3) % @words] } 0 .. ($i % 9);
    push @prompts, "Prompt $i: @w and then" . (' more' x ($i % 5));
}

my $t0 = time;
my @st = sse_many([ map { [ '/v1/completions',
    { model => $M, prompt => $_, max_tokens => 24, temperature => 0,
      stream => JSON::PP::true } ] } @prompts ], timeout => 180);
my $conc = time - $t0;
my @done = grep { $_->done && !$_->errors && $_->status == 200 } @st;
is(scalar @done, $N, "$N concurrent streams end with [DONE]")
    or diag join "\n", map { "$_: " . $st[$_]->summary } grep {
        !($st[$_]->done && !$st[$_]->errors) } 0 .. $N - 1;

# did they overlap? (every stream's first token came before any stream ended)
my $first_max = 0;
my $end_min = 1e9;
for (@st) {
    my @e = $_->events or next;
    $first_max = $e[0]{t} if $e[0]{t} > $first_max;
    $end_min = $e[-1]{t} if $e[-1]{t} < $end_min;
}
diag(sprintf "concurrent: %.2fs; last first-token %.3fs, first end %.3fs",
     $conc, $first_max, $end_min);

$t0 = time;
my $same = 0;
for my $i (0 .. $N - 1) {
    my ($code, undef, $j) = http(POST => '/v1/completions',
        { model => $M, prompt => $prompts[$i], max_tokens => 24,
          temperature => 0 });
    my $want = $j->{choices}[0]{text};
    if ($code == 200 && defined $want && $st[$i]->text eq $want) {
        $same++;
    } else {
        diag("prompt $i: concurrent " . json_encode($st[$i]->text)
             . "\n  sequential ($code) " . json_encode($want // $j));
    }
}
diag(sprintf "sequential: %.2fs", time - $t0);
is($same, $N, 'every concurrent output == its sequential output');

my ($hs, undef, $h) = http(GET => '/health');
is($hs, 200, '/health after the burst');

finish();
