#!/usr/bin/perl
# Expert parallelism through nginx (issue 11): vllm.expert_parallel with
# tensor_parallel_size 2 on the CPU backend (engine.cpu_tensor_parallel)
# serves greedy completions equal to a one-rank server's, and
# /v1/stats/performance reports experts.rank_load: one entry per rank,
# every rank busy, adding up to the routed (token, expert) rows of
# experts.counts; the one-rank server has no rank_load.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my @prompts = ('In the beginning', 'And the earth was', 'Let there be');

sub completions {
    my $M = model_id();
    my @out;
    for my $p (@prompts) {
        my ($st, undef, $j) = http(POST => '/v1/completions',
            { model => $M, prompt => $p, max_tokens => 12, temperature => 0,
              ignore_eos => JSON::PP::true });
        push @out, $st == 200 ? $j->{choices}[0]{text} : "HTTP $st";
    }
    return @out;
}

sub perf { my (undef, undef, $j) = http(GET => '/v1/stats/performance'); $j }

my $one = start_server();
my @ref = completions();
my $p1 = perf();
ok(!exists $p1->{experts}{rank_load},
   'one rank: no experts.rank_load in the stats');
stop_server($one);

start_server(vllm => { tensor_parallel_size => 2,
                       expert_parallel => \'true' },
             engine => { backend => 'cpu', cpu_tensor_parallel => \'true' });
my @ep = completions();
is_deeply(\@ep, \@ref, 'expert_parallel on 2 cpu ranks: the greedy '
          . 'completions of one rank');
my $p = perf();
my $rl = $p->{experts}{rank_load};
is(ref $rl, 'ARRAY', 'experts.rank_load is a list');
is(scalar @{ $rl // [] }, 2, 'one entry per rank');
my $rows = 0;
$rows += $_ for map { @$_ } @{ $p->{experts}{counts} // [] };
my $sum = 0;
$sum += $_ for @{ $rl // [] };
ok($rows > 0 && $sum == $rows && !grep({ $_ <= 0 } @{ $rl // [] }),
   "the ranks' loads (@{ $rl // [] }) add up to the $rows routed rows, "
   . 'every rank busy');
finish();
