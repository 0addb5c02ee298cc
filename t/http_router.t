#!/usr/bin/perl
# The cache-aware router: a front nginx that loads the module with no
# engine (no moe_engine, no moe_api) balances two LocalMoE nodes with
# `hash $moe_prefix_key consistent` (t/lib/LocalMoE/Router.pm, the shape of
# conf/router.conf).  Checks:
#   * $moe_prefix_key: 16 hex digits; turn 2 and 3 of a conversation key
#     like turn 1; other conversations key otherwise; a body nginx wrote to
#     a file keys like the same body in memory; moe_prefix_key_bytes
#     bounds it; non-JSON bodies and bodies without a body get a per-request
#     "none-" key (spread), never an error;
#   * the front starts no engine;
#   * every turn of a conversation reaches the same node, and its second
#     turn reports usage.prompt_tokens_details.cached_tokens > 0;
#   * different conversations spread over both nodes;
#   * a stream through the front is unbuffered SSE to [DONE];
#   * a node stopped mid-test is routed around with no failed request
#     (proxy_next_upstream error ... non_idempotent retries the first one);
#   * conf/router.conf and conf/front-proxy.conf pass `nginx -t`;
#     moe_prefix_key_bytes 0 does not.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use File::Temp ();
use LocalMoE::Test;
use LocalMoE::Router;

my $A = start_server();
my $B = start_server();
my $M = model_id();
my %name = ($A->port => 'A', $B->port => 'B');
my $F = start_front(nodes => [$A, $B]);

sub front { http(@_, server => $F) }

sub key_of {
    my ($path, $body, %o) = @_;
    my ($st, $h) = front(POST => $path, $body, %o);
    return $st == 200 ? $h->{'x-moe-prefix-key'} // '' : "status $st";
}

# the node that finally answered: the last of $upstream_addr's list
sub node_of {
    my ($h) = @_;
    my $a = $h->{'x-moe-upstream'} // '';
    my ($last) = $a =~ /:(\d+)\s*\z/;
    return defined $last ? $name{$last} // "?$last" : "none ($a)";
}

my @topics = qw(foxes owls rivers comets bread glaciers violins tides);
sub conv {
    my ($i) = @_;
    return ({ role => 'system',
              content => "You are a patient teacher of natural history "
                       . "and you answer in one short sentence. Topic $i." },
            { role => 'user', content => "Tell me about $topics[$i]." });
}


# ---- the key alone
{
    my @c0 = conv(0);
    my $t1 = { model => $M, messages => \@c0, max_tokens => 4 };
    my $t2 = { model => $M, max_tokens => 4, temperature => 0,
               messages => [@c0, { role => 'assistant', content => 'Fine.' },
                            { role => 'user', content => 'And more?' }] };
    my $k1 = key_of('/key', $t1);
    like($k1, qr/\A[0-9a-f]{16}\z/, "a chat body's key is 16 hex digits ($k1)");
    is(key_of('/key', $t2), $k1, 'turn 2 (same first messages + more) keys like turn 1');
    my %seen = map { key_of('/key', { messages => [conv($_)] }) => 1 } 0 .. 7;
    is(scalar(keys %seen), 8, '8 conversations: 8 keys');
    is(key_of('/key-file', $t2), $k1,
       'a body nginx wrote to its temporary file keys like one in memory');

    # messages first, then 300 KB of other fields: read in pieces, key stops early
    my $pad = 'x' x 300_000;
    my $big = '{"messages":' . json_encode(\@c0) . ',"user":"' . $pad . '"}';
    is(key_of('/key-file', $big), $k1,
       'a 300 KB spilled body: its start is read back, the same key');
    my $late = '{"user":"' . $pad . '","messages":' . json_encode(\@c0) . '}';
    like(key_of('/key', $late), qr/\Anone-[0-9a-f]{16}\z/,
         'messages after 300 KB of other fields: past the scan bound, no key');

    is(key_of('/key-small', { messages => [conv(1)] }),
       key_of('/key-small', { messages => [conv(2)] }),
       'moe_prefix_key_bytes 16: only the first 16 bytes count');
    isnt(key_of('/key', { messages => [conv(1)] }),
         key_of('/key', { messages => [conv(2)] }),
         'the default budget sees past the shared system prompt');

    is(key_of('/key', { prompt => 'Once upon a time ' x 100, max_tokens => 2 }),
       key_of('/key', { prompt => ('Once upon a time ' x 100) . 'the end' }),
       'completions: a longer prompt with the same first 1024 bytes keys alike');

    my ($n1, $n2) = map { key_of('/key', 'this is {not json') } 1, 2;
    like($n1, qr/\Anone-[0-9a-f]{16}\z/, "a non-JSON body: a none- key ($n1)");
    isnt($n1, $n2, 'two non-JSON bodies: different keys (they spread)');
    like(key_of('/key', { model => $M }), qr/\Anone-/,
         'JSON without messages or prompt: a none- key');
    my ($st, $h) = front(GET => '/key', undef);
    like($h->{'x-moe-prefix-key'} // '', qr/\Anone-/,
         "a request without a body: a none- key (status $st)");
}


# ---- routing: every turn of a conversation on one node, cache hits
my (%home, @fail);
for my $i (0 .. $#topics) {
    my @msgs = conv($i);
    for my $turn (1 .. 3) {
        my ($st, $h, $j) = front(POST => '/v1/chat/completions',
            { model => $M, messages => \@msgs, max_tokens => 6,
              temperature => 0 });
        if ($st != 200) {
            push @fail, "conversation $i turn $turn: $st";
            last;
        }
        my $node = node_of($h);
        $home{$i} //= $node;
        push @fail, "conversation $i turn $turn went to $node, not $home{$i}"
            if $node ne $home{$i};
        my $cached = $j->{usage}{prompt_tokens_details}{cached_tokens} // -1;
        push @fail, "conversation $i turn $turn: cached_tokens $cached "
            . "of $j->{usage}{prompt_tokens}" if $turn > 1 && $cached <= 0;
        push @msgs, { role => 'assistant',
                      content => $j->{choices}[0]{message}{content} },
                    { role => 'user', content => "And then? ($turn)" };
    }
}
ok(!@fail, '8 conversations x 3 turns: all 200, every turn on its '
   . 'conversation\'s node, turns 2 and 3 with cached_tokens > 0')
    or diag(join "\n", @fail);

# spread: 32 more conversations, one turn each (with random ports the ring
# differs per run; 32 keys all on one node has odds 2^-31)
my %first;
for my $i (0 .. 31) {
    my ($st, $h) = front(POST => '/v1/chat/completions',
        { model => $M, max_tokens => 1, temperature => 0,
          messages => [{ role => 'user', content => "Question number $i?" }] });
    $first{ $st == 200 ? node_of($h) : "status $st" }++;
}
ok(($first{A} // 0) > 0 && ($first{B} // 0) > 0 && keys(%first) == 2,
   'different conversations spread over both nodes ('
   . join(', ', map { "$_ $first{$_}" } sort keys %first) . ' of 32)');

# ---- a stream through the front
{
    my $st = sse('/v1/chat/completions',
                 { model => $M, messages => [conv(0)], max_tokens => 4,
                   stream => JSON::PP::true }, server => $F);
    is($st->status, 200, 'a stream through the front: 200');
    ok($st->done && !$st->errors, 'SSE events to [DONE], no framing error');
    is($st->header('x-accel-buffering'), 'no',
       'X-Accel-Buffering: no passes the front (proxy_pass_header)');
    is(node_of($st->headers), $home{0}, "the stream went to conversation 0's node");
}

# ---- a node stops: routed around, no request fails
{
    my ($gone) = grep { $name{ $_->port } eq $home{0} } $A, $B;
    my $left = $gone == $A ? 'B' : 'A';
    stop_server($gone);
    my (@bad, %now, $tried);
    for my $i (0 .. $#topics) {
        my ($st, $h, $j) = front(POST => '/v1/chat/completions',
            { model => $M, messages => [conv($i)], max_tokens => 4,
              temperature => 0 });
        push @bad, "conversation $i: status $st" if $st != 200;
        $now{ node_of($h) }++;
        $tried //= $h->{'x-moe-upstream'} // '';
    }
    like($tried, qr/\A127\.0\.0\.1:${\ $gone->port}, 127\.0\.0\.1:\d+\z/,
         "the first request after the stop tried node $home{0}, then the "
         . "other (proxy_next_upstream): $tried");
    ok(!@bad, "node $home{0} stopped: 8 more requests, none failed")
        or diag(join "\n", @bad);
    is(join(',', keys %now), $left, "all of them answered by node $left");
}

# ---- the conf/ examples pass nginx -t (paths moved to a temp prefix)
for my $name (qw(router front-proxy)) {
    my $d = File::Temp::tempdir('localmoe-conf-XXXXXX', TMPDIR => 1,
                                CLEANUP => 1);
    my $c = slurp(root_dir() . "/conf/$name.conf");
    $c =~ s{build/front/}{$d/}g;
    $c =~ s{build/nginx/objs/ngx_http_moe_module\.so}{${\ so_path()}}g;
    open my $fh, '>', "$d/nginx.conf" or die "$d/nginx.conf: $!";
    print $fh $c;
    close $fh;
    my ($rc, $msg) = nginx_test(bless { dir => $d }, 'LocalMoE::Test::Server');
    is($rc, 0, "conf/$name.conf passes nginx -t") or diag($msg);
    next unless $name eq 'router';

    # a budget of 0 bytes is refused, naming the directive
    $c =~ s/moe_prefix_key_bytes\s+1024;/moe_prefix_key_bytes 0;/
        or die 'conf/router.conf: no "moe_prefix_key_bytes 1024;" line';
    open $fh, '>', "$d/nginx.conf" or die "$d/nginx.conf: $!";
    print $fh $c;
    close $fh;
    ($rc, $msg) = nginx_test(bless { dir => $d }, 'LocalMoE::Test::Server');
    ok($rc != 0 && $msg =~ /moe_prefix_key_bytes.*must be between 1 and 1m/,
       'moe_prefix_key_bytes 0: nginx -t fails and says why') or diag($msg);
}

my $flog = $F->error_log;
unlike($flog, qr/moe: serving|moe_engine/, 'the front started no engine');
finish();
