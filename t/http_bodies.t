#!/usr/bin/perl
# Request bodies (issue 9 item 3).  Checks: a Transfer-Encoding: chunked
# POST streamed towards 1 GiB (generated on the fly) is refused with a JSON
# 413 as soon as it crosses moe_max_body_size, after far less than 1 GiB was
# sent, and nginx's client_body_temp never holds more than the limit; a
# chunked body under the limit is served; a string holding \u0000 (a model
# name, a prompt, a message) is refused with 400 rather than cut at the NUL
# (so "name\u0000zzz" never matches the served model), while an escaped
# backslash before "u0000" is ordinary text; a key given twice in any JSON
# object is a 400 naming the key.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use File::Find;
use Time::HiRes qw(time);
use LocalMoE::Test;

my $LIMIT = 256 * 1024;
my $s = start_server(location_conf => "moe_max_body_size 256k;");
my $M = model_id();
my $P = '/v1/completions';

# Bytes in the worker's request body temp files.  nginx unlinks them as
# soon as it opens them, so they are found as the worker's open files
# (/proc/PID/fd) under client_body_temp, and sized through the link.
sub temp_bytes {
    my $n = 0;
    my $master = $s->{pid};
    for my $stat (glob '/proc/[0-9]*/stat') {
        my $line = LocalMoE::Test::slurp($stat);
        my ($pid, $ppid) = $line =~ /^(\d+) \(.*\) \S+ (\d+)/s or next;
        next unless $ppid == $master;
        for my $fd (glob "/proc/$pid/fd/*") {
            my $to = readlink $fd // next;
            $n += (-s $fd // 0) if $to =~ /client_body_temp/;
        }
    }
    return $n;
}

# a raw request; the body is a list of chunk payloads or a code ref giving
# the next payload (undef: done).  Returns (status line code, headers,
# body, bytes of body sent, the largest client_body_temp seen).
sub chunked {
    my ($next) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $s->port, Proto => 'tcp') or die "connect: $!";
    $sock->blocking(0);
    my $out = "POST $P HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        . "Content-Type: application/json\r\n"
        . "Transfer-Encoding: chunked\r\n\r\n";
    my ($sent, $resp, $max_temp, $ended) = (0, '', 0, 0);
    my $sel = IO::Select->new($sock);
    my $deadline = time + 60;
    while (time < $deadline) {
        if ($out eq '' && !$ended) {
            my $piece = $next->();
            if (defined $piece) {
                $out = sprintf("%x\r\n", length $piece) . $piece . "\r\n";
                $sent += length $piece;
            } else {
                $out = "0\r\n\r\n";
                $ended = 1;
            }
        }
        my ($r, $w) = IO::Select->select($sel, $out ne '' ? $sel : undef,
                                         undef, 0.5);
        if ($w && @$w) {
            my $n = syswrite $sock, $out;
            if (defined $n) {
                substr($out, 0, $n, '');
            } elsif (!$!{EAGAIN}) {
                $out = '';
                $ended = 1;            # the server closed: stop sending
            }
        }
        my $t = temp_bytes();
        $max_temp = $t if $t > $max_temp;
        if ($r && @$r) {
            my $n = sysread $sock, my $buf, 65536;
            last if defined $n && $n == 0;
            next if !defined $n;
            $resp .= $buf;
            # stop at the first complete response
            if ($resp =~ /\r\n\r\n/ && $resp =~ /content-length:\s*(\d+)/i) {
                my $len = $1;
                my ($hd, $bd) = split /\r\n\r\n/, $resp, 2;
                last if length $bd >= $len;
            }
        }
    }
    close $sock;
    my ($code) = $resp =~ m{^HTTP/1\.\d (\d+)};
    my ($hd, $bd) = split /\r\n\r\n/, $resp, 2;
    return ($code // 0, $hd // '', $bd // '', $sent, $max_temp);
}

# 1 GiB in 64 KiB chunks, made as they go; should the server still be
# reading after 64 MiB the test stops there (and fails) rather than fill
# the disk
{
    my $chunk = 'a' x 65536;
    my $left = 1024 * 1024 * 1024;
    my $cap = $left - 64 * 1024 * 1024;
    my $first = 1;
    my ($code, $hd, $bd, $sent, $max_temp) = chunked(sub {
        return undef if $left <= $cap;
        $left -= 65536;
        if ($first) {
            $first = 0;
            return '{"model":' . json_encode($M) . ',"prompt":"'
                . substr($chunk, 0, 65536 - 20);
        }
        return $chunk;
    });
    is($code, 413, 'chunked 1 GiB body: 413');
    like($hd, qr{content-type:\s*application/json}i, '413: JSON');
    my $j = json_decode($bd);
    is(ref $j eq 'HASH' && $j->{error}{code}, 'request_too_large',
       '413: OpenAI error body, code request_too_large') or diag $bd;
    like($j->{error}{message} // '', qr/the limit is 262144 bytes/,
         '413: names the limit (not the bytes read so far)');
    cmp_ok($sent, '<', 64 * 1024 * 1024,
           'refused early: less than 64 MiB of the 1 GiB was sent')
        or diag "sent $sent";
    cmp_ok($max_temp, '<=', $LIMIT,
           "client_body_temp never held more than the limit ($max_temp)");
    like($s->error_log, qr/too large chunked body/,
         'error.log: the core stopped reading at the limit');
}

# a declared chunk larger than the limit is refused before its data
{
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $s->port, Proto => 'tcp', Timeout => 10)
        or die "connect: $!";
    print $sock "POST $P HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        . "Content-Type: application/json\r\n"
        . "Transfer-Encoding: chunked\r\n\r\n40000000\r\n" . ('{' x 100);
    my $resp = '';
    my $sel = IO::Select->new($sock);
    while ($sel->can_read(10)) {
        my $n = sysread $sock, my $buf, 65536;
        last unless $n;
        $resp .= $buf;
        last if $resp =~ /\}\}\s*\z/;
    }
    close $sock;
    like($resp, qr{^HTTP/1\.1 413}, 'a chunk declared as 1 GiB: 413 at once')
        or diag substr($resp, 0, 200);
}

# a chunked body under the limit is served (ignore_eos: an unseeded
# sampled request may draw EOS first, which made this 1 token once)
{
    my @parts = ('{"model":' . json_encode($M) . ',"pro', 'mpt":"In the ',
                 'beginning","max_tokens":2,"ignore_eos":true}');
    my ($code, $hd, $bd) = chunked(sub { shift @parts });
    is($code, 200, 'a small chunked body: 200') or diag $bd;
    is(json_decode($bd)->{usage}{completion_tokens}, 2, '... 2 tokens');
}

# \u0000 in strings
{
    my $name = $M;
    my ($st, undef, $j) = http(POST => $P,
        qq({"model":"$name\\u0000zzz","prompt":"hi","max_tokens":1}));
    is($st, 400, '"model":"name\\u0000zzz" does not match: 400');
    like($j->{error}{message} // '', qr/NUL/, '... naming the NUL');

    ($st, undef, $j) = http(POST => $P,
        qq({"model":"$name","prompt":"In the\\u0000 beginning",
            "max_tokens":1}));
    is($st, 400, 'a prompt with \\u0000: 400, not cut at the NUL');

    ($st) = http(POST => '/v1/chat/completions',
        qq({"messages":[{"role":"user","content":"a\\u0000b"}],
            "max_tokens":1}));
    is($st, 400, 'a message with \\u0000: 400');

    ($st) = http(POST => '/tokenize', qq({"prompt":"x\\u0000y"}));
    is($st, 400, '/tokenize with \\u0000: 400');

    ($st, undef, $j) = http(POST => '/tokenize',
        qq({"prompt":"x\\\\u0000y"}));
    is($st, 200, 'an escaped backslash before u0000 is plain text: 200')
        or diag explain $j;
}

# duplicate keys
{
    my ($st, undef, $j) = http(POST => $P,
        qq({"model":"$M","prompt":"hi","max_tokens":4,"max_tokens":100000}));
    is($st, 400, 'max_tokens twice: 400');
    is($j->{error}{param}, 'max_tokens', '... param max_tokens');
    like($j->{error}{message} // '', qr/duplicate key "max_tokens"/,
         '... the message names the key');

    ($st, undef, $j) = http(POST => '/v1/chat/completions',
        qq({"messages":[{"role":"user","role":"system","content":"x"}]}));
    is($st, 400, 'a key twice in a nested object: 400');
    is($j->{error}{param}, 'role', '... param role');

    my $many = join ',', map { qq("x$_":$_) } 0 .. 39;
    ($st, undef, $j) = http(POST => $P,
        qq({"model":"$M","prompt":"hi","max_tokens":1,$many,"x17":0}));
    is($st, 400, 'a key twice among 44 (the sorted check): 400');
    is($j->{error}{param}, 'x17', '... param x17');

    ($st, undef, $j) = http(POST => $P,
        qq({"model":"$M","prompt":"hi","max_tokens":1,$many}));
    is($st, 200, '44 distinct keys: 200') or diag explain $j;
}

finish();
