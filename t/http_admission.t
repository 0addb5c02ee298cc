#!/usr/bin/perl
# Admission control (issue 9 item 2): a flood of 10x capacity at once
# (max_num_seqs 4, engine.max_waiting_requests 8, 120 requests on
# non-blocking sockets) is answered 429 past the waiting limit: the 429s
# carry Retry-After and an OpenAI error body (type/code
# rate_limit_exceeded), they all come back before the admitted requests
# are done (the worker answers them without waiting for the engine), every
# admitted request completes with 200 and its full output, the 200s are
# exactly the requests the engine ran, and the stats and metrics count the
# rejected ones; nothing stays counted as waiting afterwards.  Then the
# prompt-token budget (engine.max_waiting_tokens) refuses the same way,
# naming its key.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IO::Select;
use Time::HiRes qw(time);
use LocalMoE::Test;

my $N = 120;
my $MAXTOK = 200;    # long enough that the admitted ones run for a while

# $N requests at once; returns [status, headers, body json, seconds]
sub flood {
    my ($n, $body) = @_;
    my $t0 = time;
    my @st = map { sse_open('/v1/completions', $body->($_)) } 0 .. $n - 1;
    my $sel = IO::Select->new(map { $_->{sock} } @st);
    my %by = map { fileno($_->{sock}) => $_ } @st;
    my %end;
    my $deadline = time + 300;
    while ($sel->count && time < $deadline) {
        for my $fh ($sel->can_read(0.5)) {
            my $x = $by{ fileno $fh };
            my $r = $x->pump;
            if (defined $r && $r == 0) {
                $end{ fileno $fh } = time - $t0;
                $sel->remove($fh);
            }
        }
    }
    my @out = map { [ $_->status // 0, $_->headers, $_->json,
                      $end{ fileno $_->{sock} } // 1e9 ] } @st;
    $_->close for @st;
    return @out;
}

sub perf { my (undef, undef, $j) = http(GET => '/v1/stats/performance'); $j }

my $s = start_server(vllm => { max_num_seqs => 4 },
                     engine => { max_waiting_requests => 8 });
my $M = model_id();
my $p0 = perf();

my @r = flood($N, sub {
    { model => $M, prompt => "Flood request $_[0] says", max_tokens => $MAXTOK,
      temperature => 0, ignore_eos => JSON::PP::true } });

my @ok  = grep { $_->[0] == 200 } @r;
my @rej = grep { $_->[0] == 429 } @r;
is(@ok + @rej, $N, "every one of $N requests answered 200 or 429")
    or diag join ' ', map { $_->[0] } @r;
cmp_ok(scalar @ok, '>=', 8, 'at least max_waiting_requests admitted');
cmp_ok(scalar @rej, '>', 0, 'the flood past the limit got 429s');

my $full = grep {
    my $j = $_->[2];
    ref $j eq 'HASH' && ($j->{usage}{completion_tokens} // 0) == $MAXTOK
        && length($j->{choices}[0]{text} // '') > 0
        && ($j->{choices}[0]{finish_reason} // '') eq 'length'
} @ok;
is($full, scalar @ok, "every admitted request: 200 with all $MAXTOK tokens");

my $shape = grep {
    my ($st, $h, $j) = @$_;
    ($h->{'retry-after'} // '') =~ /^[1-9]\d*$/
        && ref $j eq 'HASH' && ref $j->{error} eq 'HASH'
        && $j->{error}{type} eq 'rate_limit_exceeded'
        && $j->{error}{code} eq 'rate_limit_exceeded'
        && exists $j->{error}{param}
        && $j->{error}{message} =~ /max_waiting_requests/
} @rej;
is($shape, scalar @rej, '429: Retry-After (seconds) and an OpenAI error body '
   . 'naming engine.max_waiting_requests')
    or diag explain [ @{ $rej[0] }[1, 2] ];

my ($rmax) = sort { $b <=> $a } map { $_->[3] } @rej;
my ($rmed) = (sort { $a <=> $b } map { $_->[3] } @rej)[ @rej / 2 ];
my @okt = sort { $a <=> $b } map { $_->[3] } @ok;
diag(sprintf "%d admitted, %d refused; 429s: median %.1f ms, last %.1f ms; "
     . "200s: first %.1f ms, last %.1f ms", scalar @ok, scalar @rej,
     $rmed * 1000, $rmax * 1000, $okt[0] * 1000, $okt[-1] * 1000);
cmp_ok($rmax, '<', $okt[-1],
       'every 429 came back before the admitted requests were done');

my $p1 = perf();
is($p1->{requests}{finished} - $p0->{requests}{finished}, scalar @ok,
   '200s == requests the engine ran');
is($p1->{requests}{rejected}, scalar @rej, 'stats: requests.rejected');
is($p1->{admission}{waiting_requests}, 0, 'nothing counted as waiting after');
is($p1->{admission}{waiting_tokens}, 0, 'no waiting tokens left counted');
is($p1->{admission}{max_waiting_requests}, 8, 'the limit shown in stats');
my (undef, undef, $met) = http(GET => '/metrics');
like($met, qr/^localmoe_requests_rejected_total\{model="[^"]*"\} ${\ scalar @rej}$/m,
     '/metrics: localmoe_requests_rejected_total');

my ($hs) = http(GET => '/health');
is($hs, 200, '/health after the flood');
stop_server($s);

# the prompt-token budget: ~10-token prompts, a budget of 30 waiting tokens
$s = start_server(vllm => { max_num_seqs => 2 },
                  engine => { max_waiting_requests => 1000,
                              max_waiting_tokens => 30 });
@r = flood(40, sub {
    { model => $M, prompt => "Budget request $_[0] with a few more words",
      max_tokens => 32, temperature => 0, ignore_eos => JSON::PP::true } });
@ok  = grep { $_->[0] == 200 } @r;
@rej = grep { $_->[0] == 429 } @r;
is(@ok + @rej, 40, 'token budget: every request answered 200 or 429');
cmp_ok(scalar @rej, '>', 0, 'token budget: some refused');
cmp_ok(scalar @ok, '>', 0, 'token budget: some admitted');
is(scalar(grep { ($_->[2]{error}{message} // '') =~ /max_waiting_tokens/
                 && ($_->[1]{'retry-after'} // '') ne '' } @rej),
   scalar @rej, 'token budget: the 429s name engine.max_waiting_tokens');
is(scalar(grep { ($_->[2]{usage}{completion_tokens} // 0) == 32 } @ok),
   scalar @ok, 'token budget: admitted requests complete');
$p1 = perf();
is($p1->{admission}{waiting_tokens}, 0, 'token budget: nothing left counted');

finish();
