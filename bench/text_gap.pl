#!/usr/bin/perl
# Inter-token gaps of running streams while large prompts arrive.
#
# Starts nginx with the module (the test harness in t/lib, tiny model, CPU
# backend), opens --streams streaming completions that generate until the
# run ends (a stream that finishes is replaced), then for --quiet seconds
# only watches them, then sends --big prompts of --prompt-kb KB, one after
# the other (each is tokenized, then refused with 400 for being longer than
# max_model_len).  For each phase it prints the gaps between consecutive
# token events of a stream (events read in one recv() share a time, as in
# vLLM's ITL): count, median, p99, max.  A tokenizer on the event loop shows
# up as a max gap about as long as one big prompt's tokenizing.
#
#   perl bench/text_gap.pl [--so PATH] [--streams 32] [--prompt-kb 500]
#                          [--big 8] [--quiet 2]
#
# --so picks the module .so (default: build/nginx/objs/...), so two builds
# can be compared.  Core Perl only.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../t/lib";
use Cwd ();
use Getopt::Long;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Errno qw(EAGAIN EWOULDBLOCK EINTR);
use JSON::PP;
use Test::More ();

my %o = (streams => 32, 'prompt-kb' => 500, big => 8, quiet => 2);
GetOptions(\%o, 'so=s', 'streams=i', 'prompt-kb=i', 'big=i', 'quiet=f')
    or die "usage: $0 [--so PATH] [--streams N] [--prompt-kb KB] "
         . "[--big N] [--quiet S]\n";
$ENV{LOCALMOE_SO} = Cwd::abs_path($o{so}) if $o{so};

require LocalMoE::Test;
LocalMoE::Test->import;
Test::More->builder->no_ending(1);
Test::More->builder->output(\my $sink);

my $MAXT = 2000;
my $s = start_server(vllm => { max_model_len => 2048, max_num_seqs => 64 },
                     engine => { kv_cache_blocks => 4400 },
                     location_conf => "moe_max_body_size 8m;");
my $M = model_id();

sub text_of {
    my ($bytes, $x) = @_;
    my @syl = qw(ka lo mi ne ru sa to vi ze pa qu in or el an us th ch);
    my $t = '';
    while (length $t < $bytes) {
        my $w = '';
        $x = ($x * 1103515245 + 12345) % 2147483648;
        for (0 .. ($x >> 16) % 4) {
            $x = ($x * 1103515245 + 12345) % 2147483648;
            $w .= $syl[($x >> 16) % @syl];
        }
        $t .= ($x & 0x100 ? ' ' : ', ') . $w;
    }
    return $t;
}

sub conn {
    my ($body) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $s->port, Proto => 'tcp') or die "connect: $!";
    my $req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        . "Connection: close\r\nContent-Type: application/json\r\n"
        . "Content-Length: " . length($body) . "\r\n\r\n" . $body;
    $sock->blocking(1);
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite $sock, $req, length($req) - $off, $off;
        die "write: $!" unless defined $n || $! == EINTR;
        $off += $n // 0;
    }
    $sock->blocking(0);
    return { sock => $sock, last => undef, tail => '', resp => '' };
}

my $k = 0;
sub stream_new {
    return conn(encode_json({ model => $M, prompt => "Stream " . $k++,
        max_tokens => $MAXT, temperature => 0, ignore_eos => JSON::PP::true,
        stream => JSON::PP::true }));
}

my @st = map { stream_new() } 1 .. $o{streams};
my @gaps;          # [start, end] of each gap between two token events
my $big;           # the big request in flight
my @big_spans;     # [sent, answered]
my $sent_big = 0;
my $t0 = time;
my $t_big0;

while (1) {
    my $now = time;

    if (!$big && $now - $t0 >= $o{quiet} + 1 && $sent_big < $o{big}) {
        $t_big0 //= $now;
        $big = conn(encode_json({ model => $M, max_tokens => 8,
            prompt => text_of($o{'prompt-kb'} * 1000, 7 + $sent_big) }));
        $big->{t} = time;
        $sent_big++;
    }
    last if !$big && $sent_big >= $o{big};

    my %by = map { fileno($_->{sock}) => $_ } @st, $big ? ($big) : ();
    my $sel = IO::Select->new(map { $_->{sock} } values %by);
    for my $fh ($sel->can_read(0.05)) {
        my $x = $by{ fileno $fh };
        my $n = sysread $fh, my $buf, 262144;
        next if !defined $n && ($! == EAGAIN || $! == EWOULDBLOCK
                                || $! == EINTR);
        my $t = time;
        if (!$n) {
            close $fh;
            if ($big && $x == $big) {
                push @big_spans, [ $big->{t}, $t ];
                warn "big prompt: unexpected answer: "
                    . substr($big->{resp}, 0, 120) . "\n"
                    unless $big->{resp} =~ m{^HTTP/1\.1 400};
                $big = undef;
            } else {
                @st = grep { $_ != $x } @st;
                push @st, stream_new();
            }
            next;
        }
        if ($big && $x == $big) {
            $big->{resp} .= $buf;
            next;
        }
        my $d = $x->{tail} . $buf;
        $x->{tail} = substr($d, -8);
        next unless $d =~ /\ndata: \{/;
        # the 1st second lets every stream start; its gaps are not counted
        push @gaps, [ $x->{last}, $t ]
            if defined $x->{last} && $x->{last} - $t0 > 1;
        $x->{last} = $t;
    }
}
my $t_end = time;
close $_->{sock} for @st;
$s->stop(quiet => 1);

sub report {
    my ($name, @g) = @_;
    my @d = sort { $a <=> $b } map { ($_->[1] - $_->[0]) * 1000 } @g;
    if (!@d) {
        printf "%-34s no gaps\n", $name;
        return;
    }
    my $p = sub { $d[ int($_[0] * $#d + 0.5) ] };
    printf "%-34s %7d gaps  median %7.2f ms  p99 %8.2f ms  max %8.2f ms\n",
        $name, scalar @d, $p->(0.5), $p->(0.99), $d[-1];
}

my $tok = 0;
$tok += $_->[1] - $_->[0] for @big_spans;
printf "%d streams; %d prompts of %d KB, %.3f s each on average "
    . "(sent to 400)\n", $o{streams}, scalar @big_spans, $o{'prompt-kb'},
    @big_spans ? $tok / @big_spans : 0;
report('quiet (no big prompt)', grep { $_->[1] < $t_big0 } @gaps);
report('while big prompts arrive', grep { $_->[0] >= $t_big0 } @gaps);
