#!/usr/bin/perl
# Bad requests get the right HTTP status and an OpenAI error body
# {"error":{"message","type","param","code"}} (JSON), and the server keeps
# serving: a good request after all of them still returns 200.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);
use LocalMoE::Test;

my $s = start_server();             # max_model_len 256
my $M = model_id();
my $T = JSON::PP::true;
my $F = JSON::PP::false;
my $msgs = [{ role => 'user', content => 'hi' }];
my %chat = (model => $M, messages => $msgs, max_tokens => 2);
my %cmp  = (model => $M, prompt => 'hi', max_tokens => 2);
my $C = '/v1/chat/completions';
my $P = '/v1/completions';

# [ what, method, path, body (ref: JSON; string: raw bytes), status,
#   optional: { code => ..., message => qr/.../ } ]
my @cases = (
    ['invalid JSON', POST => $C, '{"model": "x", "messages": [', 400],
    ['JSON not an object', POST => $C, '[1, 2, 3]', 400],
    ['JSON string', POST => $P, '"hello"', 400],
    ['empty body', POST => $C, '', 400],
    ['trailing garbage', POST => $P, json_encode(\%cmp) . ' xyz', 400],
    ['missing messages', POST => $C, { model => $M }, 400],
    ['messages not an array', POST => $C, { %chat, messages => 'hi' }, 400],
    ['empty messages', POST => $C, { %chat, messages => [] }, 400],
    ['message without role', POST => $C,
        { %chat, messages => [{ content => 'hi' }] }, 400],
    ['bad role', POST => $C,
        { %chat, messages => [{ role => 'wizard', content => 'hi' }] }, 400],
    ['content wrong type', POST => $C,
        { %chat, messages => [{ role => 'user', content => 123 }] }, 400],
    ['message not an object', POST => $C, { %chat, messages => ['hi'] }, 400],
    ['missing prompt', POST => $P, { model => $M, max_tokens => 2 }, 400],
    ['prompt wrong type', POST => $P, { %cmp, prompt => 42 }, 400],
    ['prompt object', POST => $P, { %cmp, prompt => { a => 1 } }, 400],
    ['batched prompts', POST => $P, { %cmp, prompt => ['a', 'b'] }, 400],
    ['unknown model', POST => $C, { %chat, model => 'no-such-model' }, 404,
        { code => 'model_not_found' }],
    ['unknown model (completions)', POST => $P,
        { %cmp, model => 'no-such-model' }, 404, { code => 'model_not_found' }],
    ['model wrong type', POST => $C, { %chat, model => 7 }, 400],
    ['max_tokens negative', POST => $P, { %cmp, max_tokens => -1 }, 400],
    ['max_tokens 0', POST => $P, { %cmp, max_tokens => 0 }, 400],
    ['max_tokens huge', POST => $P, { %cmp, max_tokens => 100000 }, 400],
    ['max_tokens wrong type', POST => $P, { %cmp, max_tokens => 'ten' }, 400],
    ['max_tokens fractional', POST => $P, { %cmp, max_tokens => 2.5 }, 400],
    ['temperature -1', POST => $P, { %cmp, temperature => -1 }, 400],
    ['temperature 3', POST => $P, { %cmp, temperature => 3 }, 400],
    ['temperature string', POST => $P, { %cmp, temperature => 'hot' }, 400],
    ['top_p 0', POST => $P, { %cmp, top_p => 0 }, 400],
    ['top_p 1.5', POST => $P, { %cmp, top_p => 1.5 }, 400],
    ['n 0', POST => $C, { %chat, n => 0 }, 400],
    ['stream "yes"', POST => $C, { %chat, stream => 'yes' }, 400],
    ['stop with 5 entries', POST => $P,
        { %cmp, stop => [qw(a b c d e)] }, 400],
    ['stop wrong type', POST => $P, { %cmp, stop => 5 }, 400],
    ['prompt token id out of vocab', POST => $P,
        { %cmp, prompt => [1, 999999999] }, 400],
    ['prompt token id negative', POST => $P, { %cmp, prompt => [1, -5] }, 400],
    ['prompt over max_model_len', POST => $P,
        { %cmp, prompt => 'hello world ' x 400 }, 400,
        { message => qr/maximum context length/ }],
    ['chat over max_model_len', POST => $C, { %chat,
        messages => [{ role => 'user', content => 'hello world ' x 400 }] },
        400, { message => qr/maximum context length/ }],
    ['invalid UTF-8 in a JSON string', POST => $P,
        '{"model":' . json_encode($M)
        . ',"prompt":"abc\xff\xfe\xc3(","max_tokens":2}', 400],
    ['wrong method', GET => $P, undef, 405],
    ['wrong method (chat)', PUT => $C, { %chat }, 405],
    ['unknown path', GET => '/v1/nothing-here', undef, 404],
    ['unknown path (POST)', POST => '/v2/completions', { %cmp }, 404],
    ['stream_options without stream', POST => $C,
        { %chat, stream_options => { include_usage => $T } }, 400],
    ['top_logprobs without logprobs', POST => $C,
        { %chat, top_logprobs => 2 }, 400],
    ['presence_penalty 5', POST => $P, { %cmp, presence_penalty => 5 }, 400],
    ['seed wrong type', POST => $P, { %cmp, seed => 'abc' }, 400],
);

sub check_error_body {
    my ($what, $j, $raw, $hdr, $extra) = @_;
    like($hdr->{'content-type'} // '', qr{^application/json},
         "$what: JSON Content-Type");
    my $e = ref $j eq 'HASH' ? $j->{error} : undef;
    ok(ref $e eq 'HASH'
       && defined $e->{message} && !ref $e->{message} && length $e->{message}
       && defined $e->{type} && !ref $e->{type} && length $e->{type}
       && exists $e->{param} && exists $e->{code},
       "$what: OpenAI error body") or diag "body: " . substr($raw, 0, 300);
    if ($extra && $extra->{code}) {
        is($e->{code}, $extra->{code}, "$what: code $extra->{code}");
    }
    if ($extra && $extra->{message}) {
        like($e->{message} // '', $extra->{message}, "$what: message");
    }
}

for my $c (@cases) {
    my ($what, $method, $path, $body, $status, $extra) = @$c;
    my ($st, $h, $j, $raw) = http($method, $path, $body);
    is($st, $status, "$what: $status")
        or diag "got $st: " . substr($raw, 0, 300);
    check_error_body($what, $j, $raw, $h, $extra);
}

# the same errors for a streaming request come before any event, as JSON
{
    my ($st, $h, $j, $raw) = http(POST => $C,
        { %chat, stream => $T, temperature => -1 });
    is($st, 400, 'stream + bad temperature: 400 (not an SSE stream)');
    check_error_body('stream + bad temperature', $j, $raw, $h);
    my ($st2, $h2, $j2, $raw2) = http(POST => $P,
        { %cmp, stream => $T, model => 'nope' });
    is($st2, 404, 'stream + unknown model: 404');
    check_error_body('stream + unknown model', $j2, $raw2, $h2,
                     { code => 'model_not_found' });
}

# a 2 MB body: 413 with a JSON error, read while we are still sending
{
    my $big = '{"model":' . json_encode($M) . ',"prompt":"'
        . ('a' x (2 * 1024 * 1024)) . '","max_tokens":1}';
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $s->port, Proto => 'tcp') or die "connect: $!";
    my $req = "POST $P HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        . "Content-Type: application/json\r\nContent-Length: "
        . length($big) . "\r\n\r\n" . $big;
    $sock->blocking(0);
    my ($off, $resp) = (0, '');
    my $sel = IO::Select->new($sock);
    my $deadline = time + 20;
    while (time < $deadline) {
        my ($r, $w) = IO::Select->select($sel, $off < length $req ? $sel : undef,
                                         undef, 0.5);
        if ($w && @$w) {
            my $n = syswrite $sock, $req, 65536, $off;
            $off += $n if defined $n;
            $off = length $req if !defined $n && !$!{EAGAIN};
        }
        if ($r && @$r) {
            my $n = sysread $sock, my $buf, 65536;
            last if !$n && !(defined $n ? 0 : $!{EAGAIN});
            $resp .= $buf if $n;
        }
    }
    close $sock;
    my ($code) = $resp =~ m{^HTTP/1\.\d (\d+)};
    is($code, 413, '2 MB body: 413') or diag substr($resp, 0, 300);
    my ($hd, $bd) = split /\r\n\r\n/, $resp, 2;
    $bd //= '';
    if ($hd =~ /transfer-encoding:\s*chunked/i) {     # undo chunking
        my $out = '';
        while ($bd =~ s/^([0-9a-f]+)\r\n//i) {
            my $n = hex $1;
            last if !$n;
            $out .= substr $bd, 0, $n, '';
            $bd =~ s/^\r\n//;
        }
        $bd = $out;
    }
    my @kv = ($hd // '') =~ /^([^:\r\n]+):[ \t]*([^\r\n]*)/mg;
    my %h;
    while (my ($k, $v) = splice @kv, 0, 2) { $h{ lc $k } = $v }
    check_error_body('2 MB body', json_decode($bd), $bd, \%h);
}

# still serving
my ($st, undef, $j) = http(POST => $C, { %chat, temperature => 0 });
is($st, 200, 'a good request after all the bad ones: 200') or diag explain $j;
my ($st2, undef, $j2) = http(POST => $P, { %cmp, temperature => 0 });
is($st2, 200, 'a good completion too');
my ($hs, undef, $h) = http(GET => '/health');
is($hs, 200, '/health 200');

finish();
