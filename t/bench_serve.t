#!/usr/bin/perl
# build/bench/serve (the OpenAI streaming load generator) works, not how fast:
# a clear error and exit 1 when the server is unreachable; against the tiny
# model 8 requests at concurrency 4 all succeed, the --json report parses and
# agrees with the table, output token counts equal max_tokens (ignore_eos),
# input counts equal the requested length (token-id prompts), the vocabulary
# probe finds the model's size; chat works; length ranges follow
# --random-range-ratio; HTTP errors are counted as failures with the
# server's message; and against a fake server that dribbles a chunked SSE
# stream 1-3 bytes at a time (chunk extensions, CRLF lines, comments,
# `data:` without a space) every event is parsed, and a stream cut short
# fails with a clear reason.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use POSIX ();
use IO::Socket::INET;
use Socket qw(IPPROTO_TCP TCP_NODELAY);
use File::Temp qw(tempdir);
use LocalMoE::Test;

my $bin = root_dir() . '/build/bench/serve';
plan skip_all => "$bin not built (run make)" unless -x $bin;

my $tmp = tempdir('bench-serve-XXXXXX', TMPDIR => 1, CLEANUP => 1);

# runs the tool; returns (exit status, stdout, stderr, decoded --json or undef)
sub bench {
    my (@args) = @_;
    my $json = "$tmp/out.json";
    unlink $json;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        open STDOUT, '>', "$tmp/stdout" or POSIX::_exit(127);
        open STDERR, '>', "$tmp/stderr" or POSIX::_exit(127);
        exec $bin, @args, '--json', $json, '--timeout', 60
            or POSIX::_exit(127);
    }
    waitpid $pid, 0;
    my $rc = $? >> 8;
    my $j = -s $json ? json_decode(slurp($json)) : undef;
    return ($rc, slurp("$tmp/stdout"), slurp("$tmp/stderr"), $j);
}

sub table_value {
    my ($out, $label) = @_;
    return $out =~ /^\Q$label\E\s+(\S+)/m ? $1 : undef;
}


# ---- unreachable server: exit 1, one clear line, no report
{
    my $port = free_port();
    my ($rc, $out, $err, $j) = bench('--port', $port, '--num-prompts', 2);
    is($rc, 1, 'unreachable server: exit status 1');
    like($err, qr/error: cannot reach the server at http:\/\/127\.0\.0\.1:$port.*Connection refused/,
         'unreachable server: stderr names the URL and the reason')
        or diag $err;
    is($out, '', 'unreachable server: no report on stdout');
    ok(!defined $j, 'unreachable server: no --json written');

    ($rc, undef, $err) = bench('--num-prompts', 0);
    is($rc, 1, 'bad option value: exit status 1');
    like($err, qr/--num-prompts: want an integer/, 'bad option: says which');
}


# ---- the real server (tiny model: vocab 512, max_model_len 256)
my $s = start_server();
my $url = $s->url;

{
    my ($rc, $out, $err, $j) = bench('--base-url', $url, '--num-prompts', 8,
        '--max-concurrency', 4, '--random-input-len', 16,
        '--random-output-len', 12, '--warmup', 1, '--seed', 3);
    is($rc, 0, 'completions: exit status 0') or diag "$err\n$out";
    ok($j, '--json parses') or diag slurp("$tmp/out.json");
    $j //= {};
    is($j->{completed}, 8, 'all 8 requests succeeded')
        or diag "first error: " . ($j->{first_error} // 'none');
    is($j->{failed}, 0, 'none failed');
    ok(!defined $j->{first_error}, 'no error recorded');
    is($j->{model_id}, model_id(), 'model defaults to GET /v1/models data[0].id');
    is($j->{vocab_max}, 512, 'vocabulary size probed from the server');
    is_deeply($j->{output_lens}, [ (12) x 8 ],
              'output tokens (usage) == max_tokens for every request');
    is_deeply($j->{input_lens}, [ (16) x 8 ],
              'input tokens (usage) == requested prompt length');
    is($j->{total_output_tokens}, 96, 'total generated tokens');
    is($j->{total_input_tokens}, 128, 'total input tokens');
    is($j->{output_len_mismatches}, 0, 'no output length mismatches');
    ok($j->{max_concurrent_requests} >= 1
       && $j->{max_concurrent_requests} <= 4,
       'never more than --max-concurrency open')
        or diag "peak $j->{max_concurrent_requests}";
    ok($j->{duration} > 0, 'duration > 0');
    ok($j->{mean_ttft_ms} > 0 && $j->{p99_ttft_ms} >= $j->{median_ttft_ms},
       'TTFT stats: positive, p99 >= median');
    # TPOT and ITL are recomputed from the per-request arrays (not > 0:
    # a client that is descheduled while the server sends reads several
    # events at once, and their gaps are then 0)
    {
        my ($tp, $n_tp, $it, $n_it) = (0, 0, 0, 0);
        for my $i (0 .. 7) {
            my $out = ($j->{output_lens} // [])->[$i] // 0;
            next unless $out > 1;
            $tp += ($j->{e2els}[$i] - $j->{ttfts}[$i]) / ($out - 1);
            $n_tp++;
        }
        for (@{ $j->{itls} // [] }) { $it += $_, $n_it++ for @$_ }
        my $close = sub { abs($_[0] - $_[1]) <= 1e-6 + 1e-6 * abs $_[1] };
        ok($n_tp == 8 && $n_it > 0
           && $close->($j->{mean_tpot_ms} // -1, 1e3 * $tp / $n_tp)
           && $close->($j->{mean_itl_ms} // -1, 1e3 * $it / $n_it)
           && $j->{mean_tpot_ms} >= 0 && $j->{mean_itl_ms} >= 0
           && !grep({ $_ < 0 } map { @$_ } @{ $j->{itls} // [] }),
           'TPOT and ITL: means of the per-request figures, none negative')
            or diag "tpot $j->{mean_tpot_ms} vs " . ($n_tp ? 1e3 * $tp / $n_tp : '-')
                . ", itl $j->{mean_itl_ms} vs " . ($n_it ? 1e3 * $it / $n_it : '-');
    }
    ok($j->{p99_e2el_ms} >= $j->{mean_ttft_ms}, 'E2E latency >= TTFT');
    my @itl = map { scalar @$_ } @{ $j->{itls} // [] };
    is(scalar @itl, 8, 'ITL lists for all 8 requests');
    ok(!grep({ $_ < 1 || $_ > 11 } @itl), 'each request: 1..11 gaps (12 tokens)')
        or diag "@itl";
    ok(abs($j->{output_throughput} * $j->{duration} - 96) < 1e-3,
       'output throughput == tokens / duration');

    is(table_value($out, 'Successful requests:'), 8, 'table: successful 8');
    is(table_value($out, 'Failed requests:'), 0, 'table: failed 0');
    is(table_value($out, 'Total generated tokens:'), 96, 'table: tokens 96');
    for my $l ('Benchmark duration (s):', 'Request throughput (req/s):',
               'Output token throughput (tok/s):', 'Mean TTFT (ms):',
               'Median TTFT (ms):', 'P99 TTFT (ms):', 'Mean TPOT (ms):',
               'P99 ITL (ms):', 'Median E2EL (ms):', 'P99 E2EL (ms):') {
        like(table_value($out, $l) // '', qr/^\d+\.\d\d$/, "table: $l");
    }
}

{
    my ($rc, $out, $err, $j) = bench('--base-url', $url, '--endpoint',
        '/v1/chat/completions', '--num-prompts', 4, '--max-concurrency', 2,
        '--random-input-len', 12, '--random-output-len', 6, '--quiet');
    is($rc, 0, 'chat: exit status 0') or diag "$err\n$out";
    is($j && $j->{completed}, 4, 'chat: 4 succeeded');
    is_deeply($j && $j->{output_lens}, [ (6) x 4 ],
              'chat: output tokens == max_tokens');
}

{
    my ($rc, $out, $err, $j) = bench('--base-url', $url, '--num-prompts', 8,
        '--request-rate', 50, '--random-input-len', 16,
        '--random-output-len', 12, '--random-range-ratio', 0.5, '--quiet');
    is($rc, 0, 'range ratio + Poisson rate: exit status 0') or diag $err;
    my @in = @{ $j ? $j->{input_lens} : [] };
    my @out = @{ $j ? $j->{output_lens} : [] };
    ok(@in == 8 && !grep({ $_ < 8 || $_ > 24 } @in),
       'input lengths in [8, 24]') or diag "@in";
    ok(@out == 8 && !grep({ $_ < 6 || $_ > 18 } @out),
       'output lengths in [6, 18]') or diag "@out";
    is_deeply(\@out, $j && $j->{requested_output_lens},
              'each output length == its requested max_tokens');
}

{
    my ($rc, $out, $err, $j) = bench('--base-url', $url, '--num-prompts', 3,
        '--random-input-len', 300, '--random-output-len', 4, '--quiet');
    is($rc, 2, 'too-long prompts: exit status 2 (some failed)');
    is($j && $j->{failed}, 3, 'too-long prompts: all 3 failed');
    like($j && $j->{first_error}, qr/^HTTP 400: .*maximum context length/,
         'the first error carries the status and the server message');
    like($out, qr/^First error:\s+HTTP 400/m, 'table shows the first error');
}

stop_server($s);


# ---- a fake server that dribbles the stream
sub fake_server {
    my $port = free_port();
    my $ls = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => $port, Listen => 64, ReuseAddr => 1, Proto => 'tcp')
        or die "listen: $!";
    my $pid = fork // die "fork: $!";
    return ($pid, $port) if $pid;

    alarm 60;
    while (my $c = $ls->accept) {
        my $req = '';
        while ($req !~ /\r\n\r\n/) {
            sysread($c, $req, 4096, length $req) or last;
        }
        my ($hd, $body) = split /\r\n\r\n/, $req, 2;
        $body //= '';
        my $len = $hd =~ /Content-Length: (\d+)/i ? $1 : 0;
        while (length $body < $len) {
            sysread($c, $body, 4096, length $body) or last;
        }
        if ($hd =~ m{^GET /v1/models}) {
            my $m = '{"object":"list","data":[{"id":"fake"}]}';
            syswrite $c, "HTTP/1.1 200 OK\r\nContent-Type: application/json"
                . "\r\nContent-Length: " . length($m)
                . "\r\nConnection: close\r\n\r\n$m";
            close $c;
            next;
        }
        my $n = $body =~ /"max_tokens":(\d+)/ ? $1 : 1;
        my $sse = ": keep-alive\n\n";
        for my $i (1 .. $n) {
            my $d = qq({"choices":[{"index":0,"text":"t$i",)
                . qq("finish_reason":null}],"usage":null});
            $sse .= $i == 2 ? "data:$d\n\n" : "data: $d\n\n";
        }
        $sse .= qq(data: {"choices":[{"index":0,"text":"",)
            . qq("finish_reason":"length"}],"usage":null}\r\n\r\n);
        $sse .= qq(data: {"choices":[],"usage":{"prompt_tokens":5,)
            . qq("completion_tokens":$n,"total_tokens":@{[5 + $n]}}}\n\n);
        $sse .= "data: [DONE]\n\n";
        my $cut = $n == 7;              # max_tokens 7: the stream breaks off
        $sse = substr($sse, 0, length($sse) / 2) if $cut;

        my $http = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            . "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        my ($off, $k) = (0, 0);
        while ($off < length $sse) {
            my $sz = 1 + ($k++ * 7) % 23;
            my $piece = substr($sse, $off, $sz);
            $off += length $piece;
            $http .= sprintf("%x%s\r\n", length $piece, $k % 3 ? '' : ';x=y')
                . "$piece\r\n";
        }
        $http .= "0\r\n\r\n" unless $cut;
        setsockopt($c, IPPROTO_TCP, TCP_NODELAY, 1);
        for (my $i = 0, my $j = 0; $i < length $http; $j++) {
            my $w = 1 + $j % 3;
            syswrite $c, substr($http, $i, $w);
            $i += $w;
            select(undef, undef, undef, 0.0003);
        }
        close $c;
    }
    POSIX::_exit(0);
}

{
    my ($pid, $port) = fake_server();
    my $furl = "http://127.0.0.1:$port";
    my ($rc, $out, $err, $j) = bench('--base-url', $furl, '--num-prompts', 3,
        '--max-concurrency', 2, '--random-input-len', 5,
        '--random-output-len', 4, '--vocab-max', 100, '--quiet');
    is($rc, 0, 'dribbled stream: exit status 0') or diag "$err\n$out";
    is($j && $j->{completed}, 3, 'dribbled stream: 3 succeeded')
        or diag $j && $j->{first_error};
    is($j && $j->{model_id}, 'fake', 'model from a Content-Length /v1/models');
    is_deeply($j && $j->{output_lens}, [4, 4, 4], 'completion_tokens from usage');
    is_deeply($j && $j->{input_lens}, [5, 5, 5], 'prompt_tokens from usage');
    is_deeply([ map { scalar @$_ } @{ $j ? $j->{itls} : [] } ], [3, 3, 3],
              'every text event timed (4 tokens: 3 gaps), empty finish '
              . 'chunk not counted');

    ($rc, $out, $err, $j) = bench('--base-url', $furl, '--num-prompts', 1,
        '--random-input-len', 5, '--random-output-len', 7, '--vocab-max',
        100, '--quiet');
    is($rc, 2, 'stream cut short: exit status 2');
    like($j && $j->{first_error}, qr/connection closed before the response ended/,
         'stream cut short: the reason is clear');
    kill 'KILL', $pid;
    waitpid $pid, 0;
}

finish();
