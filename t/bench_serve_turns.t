#!/usr/bin/perl
# build/bench/serve --turns (multi-turn conversations) works: against the
# tiny model, 3 conversations x 3 turns all succeed; each later turn's prompt
# is longer than the turn before (it carries the history and the streamed
# reply); later turns report cached prompt tokens (the conversation's
# prefix), and the report's hit rate is cached over prompt tokens, in the
# table and in --json alike; --turns with the completions endpoint is a
# usage error.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX ();
use File::Temp qw(tempdir);
use LocalMoE::Test;

my $bin = root_dir() . '/build/bench/serve';
plan skip_all => "$bin not built (run make)" unless -x $bin;
my $tmp = tempdir('bench-turns-XXXXXX', TMPDIR => 1, CLEANUP => 1);

sub bench {
    my (@args) = @_;
    my $json = "$tmp/out.json";
    unlink $json;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        open STDOUT, '>', "$tmp/stdout" or POSIX::_exit(127);
        open STDERR, '>', "$tmp/stderr" or POSIX::_exit(127);
        exec $bin, @args, '--json', $json, '--timeout', 120
            or POSIX::_exit(127);
    }
    waitpid $pid, 0;
    my $rc = $? >> 8;
    my $j = -s $json ? json_decode(slurp($json)) : undef;
    return ($rc, slurp("$tmp/stdout"), slurp("$tmp/stderr"), $j);
}

{
    my ($rc, $out, $err) = bench('--port', free_port(), '--turns', 2);
    is($rc, 1, '--turns with /v1/completions: exit status 1');
    like($err, qr/--turns needs --endpoint \/v1\/chat\/completions/,
         'and a message that says why');
}

my $s = start_server(vllm => { max_model_len => 1024 });
my ($rc, $out, $err, $j) = bench('--port', $s->port,
    '--endpoint', '/v1/chat/completions', '--turns', 3, '--num-prompts', 3,
    '--random-input-len', 40, '--random-output-len', 4, '--turn-len', 6,
    '--max-concurrency', 2, '--quiet');
is($rc, 0, '3 conversations x 3 turns: exit status 0') or diag("$out\n$err");
ok($j, '--json written') or BAIL_OUT('no JSON report');
is($j->{completed}, 9, '9 requests completed');
is($j->{failed}, 0, 'none failed');
is($j->{turns}, 3, 'turns: 3');

my @in = @{ $j->{input_lens} };
my @grow;
for my $c (0 .. 2) {
    for my $t (1 .. 2) {
        my ($a, $b) = ($in[$c * 3 + $t - 1], $in[$c * 3 + $t]);
        push @grow, "conversation $c turn $t: $a -> $b" unless $b > $a + 6;
    }
}
ok(!@grow, 'each later turn\'s prompt is longer than the turn before by '
   . 'more than its user words (history and reply): ' . join(' ', @in))
    or diag(join "\n", @grow);
ok($j->{cached_tokens} > 0, "cached prompt tokens reported ($j->{cached_tokens})");
cmp_ok($j->{cached_tokens}, '<', $j->{prompt_tokens_with_usage},
       'fewer than the prompt tokens');
my $rate = 100 * $j->{cached_tokens} / $j->{prompt_tokens_with_usage};
my ($table) = $out =~ /^Prefix cache hit rate \(%\):\s+(\S+)/m;
ok(defined $table && abs($table - $rate) < 0.01,
   "the table's hit rate ($table) is cached / prompt tokens ($rate)");
ok(abs($j->{prefix_cache_hit_rate} * 100 - $rate) < 0.01,
   'and so is the JSON\'s');
like($out, qr/^Mean TTFT, later turns \(ms\):\s+\d/m,
     'TTFT of later turns is reported');

finish();
