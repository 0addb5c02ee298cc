#!/usr/bin/perl
# Prompt text work runs off the event loop (moe_thread_pool): while a ~500 KB
# prompt is being tokenized, 32 running streams keep receiving tokens and
# other requests are answered.
#
# How it tells, without timing thresholds: the big request's body goes out
# but for its last byte; once nginx has read the rest, the last byte goes
# out, so the tokenizer starts right when nginx reads it.  Then a probe
# (GET /health) is sent.  On the event loop, the tokenizer would hold the
# worker until the big request is answered (with 400: the prompt is longer
# than max_model_len, found only after tokenizing), so the probe would be
# answered after it and no stream could get an event in between.  Off the
# loop, the probe is answered first and every stream receives events
# between the probe's answer and the big answer.
#
# Also: a client that goes away while its prompt is tokenized (nothing
# leaks or crashes: error.log stays clean, the server goes on), /tokenize
# and /detokenize through the pool, a named pool, and an unknown pool name
# failing nginx -t.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time sleep);
use Errno qw(EAGAIN EWOULDBLOCK EINTR);
use LocalMoE::Test;

my $N = 32;
my $MAXT = 2000;

my $s = start_server(vllm => { max_model_len => 2048, max_num_seqs => 64 },
                     engine => { kv_cache_blocks => 4400 },
                     location_conf => "            moe_max_body_size 4m;");
my $M = model_id();

# Seeded text of about $bytes bytes: words of random letters ($slow: the
# tiny model's BPE takes seconds for 500 KB of them) or of common syllables
# (fast, a tenth of that).
sub big_text {
    my ($bytes, $seed, $slow) = @_;
    my @syl = $slow ? ('a' .. 'z')
                    : qw(ka lo mi ne ru sa to vi ze pa qu in or el an us th ch);
    my $x = $seed;
    my $t = '';
    while (length $t < $bytes) {
        my $w = '';
        $x = ($x * 1103515245 + 12345) % 2147483648;
        my $k = ($slow ? 3 : 1) + ($x >> 16) % 4;
        for (1 .. $k) {
            $x = ($x * 1103515245 + 12345) % 2147483648;
            $w .= $syl[($x >> 16) % @syl];
        }
        $t .= ($x & 0x100 ? ' ' : ', ') . $w;
    }
    return $t;
}

$SIG{PIPE} = 'IGNORE';    # a closed peer is a test result, not a death

my $TEXT = big_text(500_000, 7, 1);

# a raw HTTP/1.1 request, written in two parts: all but the last byte, and
# the last byte when told
sub raw_open {
    my ($path, $body) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $s->port, Proto => 'tcp', Timeout => 5)
        or die "connect: $!";
    my $req = defined $body
        ? "POST $path HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
          . "Content-Type: application/json\r\n"
          . "Content-Length: " . length($body) . "\r\n\r\n" . $body
        : "GET $path HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    return { sock => $sock, req => $req, off => 0, resp => '', eof => 0 };
}

# write until $upto bytes of the request are out (blocking socket)
sub raw_write {
    my ($r, $upto) = @_;
    # the server answered (or closed) early: that is reported by the
    # round's checks, with the answer, instead of dying on a closed socket
    return if $r->{eof};
    $r->{sock}->blocking(1);
    while ($r->{off} < $upto) {
        my $n = syswrite $r->{sock}, $r->{req}, $upto - $r->{off}, $r->{off};
        if (!defined $n) {
            next if $! == EINTR;
            # the server closed the connection under the write: reported
            # by the round's checks as an early answer
            $r->{resp} .= "(write failed: $!)";
            $r->{eof} = 1;
            $r->{t_end} = time;
            last;
        }
        $r->{off} += $n;
    }
    $r->{sock}->blocking(0);
}

sub raw_pump {
    my ($r) = @_;
    return 0 if $r->{eof};
    my $n = sysread $r->{sock}, my $buf, 65536;
    if (!defined $n) {
        return undef if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        $r->{eof} = 1;
        $r->{t_end} = time;
        close $r->{sock};
        return 0;
    }
    if ($n == 0) {
        $r->{eof} = 1;
        $r->{t_end} = time;
        close $r->{sock};       # else nginx lingers on it at shutdown
        return 0;
    }
    $r->{resp} .= $buf;
    return $n;
}

sub raw_status { $_[0]{resp} =~ m{^HTTP/1\.1 (\d+)} ? $1 : 0 }
sub raw_json {
    my ($r) = @_;
    my (undef, $b) = split /\r\n\r\n/, $r->{resp}, 2;
    return json_decode($b // '');
}

# A light stream reader: the client must keep up with 32 streams (parsing
# every event in Perl would not, and late reads would blur the times), so
# it only notes when bytes arrived and counts "data: " lines.
sub stream_open {
    my ($k) = @_;
    my $r = raw_open('/v1/completions', json_encode({ model => $M,
        prompt => "Stream $k says", max_tokens => $MAXT, temperature => 0,
        stream => JSON::PP::true, ignore_eos => JSON::PP::true }));
    raw_write($r, length $r->{req});
    $r->{times} = [];
    $r->{n} = 0;
    $r->{tail} = '';
    return $r;
}

sub stream_pump {
    my ($r) = @_;
    return 0 if $r->{eof};
    my $n = sysread $r->{sock}, my $buf, 262144;
    if (!defined $n) {
        return undef if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        $n = 0;
    }
    if ($n == 0) {
        $r->{eof} = 1;
        $r->{t_end} = time;
        return 0;
    }
    my $t = time;
    my $s = $r->{tail} . $buf;
    my $k = () = $s =~ /\ndata: /g;
    $r->{n} += $k;
    push @{ $r->{times} }, $t if $k;
    $r->{done} = 1 if $s =~ /data: \[DONE\]/;
    $r->{tail} = substr($s, -8);
    return $n;
}

# read what the sockets have for $secs, or until $until->() is true
sub pump_all {
    my ($streams, $raws, $secs, $until) = @_;
    my %fh;
    $fh{ fileno $_->{sock} } = [ s => $_ ] for grep { !$_->{eof} } @$streams;
    $fh{ fileno $_->{sock} } = [ r => $_ ] for grep { !$_->{eof} } @$raws;
    my $sel = IO::Select->new(map { $_->[1]{sock} } values %fh);
    my $deadline = time + $secs;
    while (time < $deadline && $sel->count) {
        last if $until && $until->();
        for my $h ($sel->can_read(0.01)) {
            my ($kind, $x) = @{ $fh{ fileno $h } };
            my $n = $kind eq 's' ? stream_pump($x) : raw_pump($x);
            $sel->remove($h) if defined $n && $n == 0;
        }
    }
}


# ---- 32 streams running, a 500 KB prompt arrives

my @st = map { stream_open($_) } 1 .. $N;

pump_all(\@st, [], 60, sub { !grep { $_->{n} < 3 } @st });
is(scalar(grep { $_->{n} >= 3 } @st), $N, "$N streams are running "
   . "(3 events each)");

# One round: the big prompt but its last byte, a pause for nginx to read
# it, the last byte, a probe; until both are answered.  Returns what the
# client saw.
my $BIG = json_encode({ model => $M, prompt => $TEXT, max_tokens => 8,
                        temperature => 0 });

sub round {
    my $big = raw_open('/v1/completions', $BIG);
    my $len = length $big->{req};

    raw_write($big, $len - 1);

    # nginx reads the rest of the body meanwhile; the streams go on
    pump_all(\@st, [ $big ], 0.3);
    my $early = $big->{eof} || $big->{resp} ne '';

    raw_write($big, $len);
    my $t_last = time;

    my $probe = raw_open('/health', undef);
    raw_write($probe, length $probe->{req});

    pump_all(\@st, [ $big, $probe ], 300,
             sub { $big->{eof} && $probe->{eof} });
    my $t_big = $big->{t_end} // time;

    my @all = sort { $a <=> $b } grep { $_ > $t_last && $_ < $t_big }
        map { @{ $_->{times} } } @st;
    my $gap = 0;
    my $prev = $t_last;
    for my $t (@all, $t_big) {
        $gap = $t - $prev if $t - $prev > $gap;
        $prev = $t;
    }

    return { big => $big, probe => $probe, early => $early,
             window => $t_big - $t_last, gap => $gap,
             probe_first => defined $probe->{t_end}
                            && $probe->{t_end} < $t_big,
             streams => scalar(grep {
                 my $x = $_;
                 grep { $_ > $t_last && $_ < $t_big } @{ $x->{times} }
             } @st) };
}

my $K = 6;
my @r = map { round() } 1 .. $K;

is(scalar(grep { !$_->{early} } @r), $K,
   'no answer before the last byte of the body')
    or diag map { "early answer: " . substr($_->{big}{resp}, 0, 400)
                  . ($_->{big}{eof} ? " (then closed)" : "") . "\n" }
            grep { $_->{early} } @r;
is(scalar(grep { raw_status($_->{big}) == 400 } @r), $K,
   'the 500 KB prompt is refused with 400 (over max_model_len, which is '
   . 'known only after tokenizing)')
    or diag substr($r[0]{big}{resp}, 0, 400);
my $bj = raw_json($r[0]{big});
like(ref $bj eq 'HASH' ? $bj->{error}{message} // '' : '',
     qr/maximum context length is 2048 tokens\. However, you requested \d{5,}/,
     'the 400 names the prompt length in tokens');
is(scalar(grep { raw_status($_->{probe}) == 200 } @r), $K,
   'the probes (GET /health) are answered');

my ($window, $gap) = (0, 0);
$window += $_->{window} for @r;
$gap += $_->{gap} for @r;

for my $x (@r) {
    diag(sprintf "window from the last byte to the 400: %.3fs; probe "
         . "answered at +%.3fs; longest stretch without a stream event: "
         . "%.3fs; %d streams had events", $x->{window},
         ($x->{probe}{t_end} // 0) - ($x->{big}{t_end} // 0) + $x->{window},
         $x->{gap}, $x->{streams});
}
diag(sprintf "most events of a stream so far: %d of %d",
     (sort { $b <=> $a } map { $_->{n} } @st)[0], $MAXT);

# On the loop, tokenizing would hold every stream and the probe for nearly
# the whole window, each round.  Summed over the rounds, so that a moment
# when this busy machine stops nginx does not decide it:
ok(scalar(grep { $_->{probe_first} } @r) > $K / 2, 'in most rounds the '
   . 'probe is answered before the big prompt (the loop is not held)');
ok($gap < $window / 2, sprintf 'the longest stretches without a stream '
   . 'event add up to less than half the windows (%.3fs of %.3fs)',
   $gap, $window);
ok(!grep({ $_->{done} || $_->{eof} } @st), 'no stream had ended by then')
    or diag 'raise max_tokens: the streams ended before the big prompts';

close $_->{sock} for @st;


# ---- a client that goes away while its prompt is tokenized

for my $path ('/v1/completions', '/v1/chat/completions', '/tokenize') {
    my $b = $path eq '/v1/chat/completions'
        ? { model => $M, messages => [ { role => 'user', content => $TEXT } ] }
        : { model => $M, prompt => $TEXT };
    my $gone = raw_open($path, json_encode($b));
    raw_write($gone, length $gone->{req});
    sleep 0.05;             # the body is in; its tokenizing is not done
    close $gone->{sock};
}

my ($hst, undef, $hj) = http(GET => '/health');
is($hst, 200, 'the server answers after clients left mid-tokenizing');

my $deadline = time + 60;
my $h;
while (time < $deadline) {
    (undef, undef, $h) = http(GET => '/health');
    last if ref $h eq 'HASH' && $h->{running} == 0 && $h->{waiting} == 0;
    sleep 0.1;
}
is(ref $h eq 'HASH' ? $h->{running} + $h->{waiting} : -1, 0,
   'nothing left running from the requests that went away');


# ---- the tokenizer routes through the pool give the same answers

my $small = "Hello, world! How are you today?";
my $tk = tokenize($small);
ok($tk->{count} > 0 && @{ $tk->{tokens} } == $tk->{count},
   '/tokenize answers count and tokens');
my ($dst, undef, $dj) = http(POST => '/detokenize', { tokens => $tk->{tokens} });
is($dst, 200, '/detokenize answers 200');
is(ref $dj eq 'HASH' ? $dj->{prompt} : undef, $small,
   '/detokenize(/tokenize(text)) gives the text back');

my $bt = tokenize(big_text(100_000, 3));
ok($bt->{count} > 2048, "/tokenize of a 100 KB text: $bt->{count} tokens "
   . "(body read from nginx's temporary file on the pool)");

# several pool threads encode and render at once: the same ids as one by one
my @bodies = map {
    $_ % 2
        ? { model => $M, prompt => big_text(1_000 + 331 * $_, $_) }
        : { model => $M, messages => [
              { role => 'system', content => big_text(3000, $_) },
              { role => 'user', content => big_text(1_000 + 337 * $_, $_) } ] }
} 1 .. 16;
my @want = map { json_encode(tokenize($_)->{tokens}) } @bodies;
my @par = map { raw_open('/tokenize', json_encode($_)) } @bodies;
raw_write($_, length $_->{req}) for @par;
pump_all([], \@par, 120, sub { !grep { !$_->{eof} } @par });
my @got = map {
    my $j = raw_json($_);
    ref $j eq 'HASH' && $j->{tokens} ? json_encode($j->{tokens}) : 'none'
} @par;
is(scalar(grep { $got[$_] eq $want[$_] } 0 .. $#want), scalar @want,
   '16 /tokenize requests at once (prompts and chat messages) give the '
   . 'same ids as one at a time');

my ($cst, undef, $cj) = http(POST => '/v1/completions', { model => $M,
    prompt => $small, max_tokens => 4, temperature => 0 });
is($cst, 200, 'a small completion after all that');
is($cj->{usage}{prompt_tokens}, $tk->{count},
   'its prompt_tokens equal /tokenize\'s count');

stop_server($s);


# ---- a named pool; an unknown name fails the configuration test

my $named = start_server(main_conf => 'thread_pool moetext threads=2;',
                         location_conf => '            moe_thread_pool moetext;');
my $nt = tokenize($small);
is_deeply($nt->{tokens}, $tk->{tokens},
          'moe_thread_pool moetext: /tokenize gives the same ids');
my $ns = sse('/v1/chat/completions', { model => model_id(),
    messages => [ { role => 'user', content => 'hi' } ], max_tokens => 4,
    stream => JSON::PP::true });
ok($ns->done, 'moe_thread_pool moetext: a chat stream ends with [DONE]')
    or diag $ns->summary;
stop_server($named);

my $bad = prepare_server(location_conf => '            moe_thread_pool nosuch;');
my ($rc, $out) = nginx_test($bad);
isnt($rc, 0, 'moe_thread_pool naming an undeclared pool fails nginx -t');
like($out, qr/unknown thread pool "nosuch"/, '... saying which pool')
    or diag $out;

finish();
