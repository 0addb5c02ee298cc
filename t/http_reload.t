#!/usr/bin/perl
# A reload that keeps serving (issue 9 item 7), on the CPU with an emulated
# device-memory budget (MOE_CPU_MEMORY_LIMIT, shared by the old and the new
# worker through MOE_CPU_MEMORY_FILE) that cannot hold two copies of the
# model, as a GPU filled by one copy cannot:
#   * `nginx -s reload` while 16 streams run: the new worker cannot load
#     while the old one holds the memory; it serves at once anyway (503 +
#     Retry-After, /health "loading", never a hang), logs "waiting for
#     memory held by the old worker", and loads as soon as the old worker
#     has finished its streams and exited;
#   * every stream finishes ([DONE], its full max_tokens, no framing
#     error): 0 dropped;
#   * the new worker then serves; the time from the reload to the first
#     served request is printed (not judged: the machine may be busy);
#   * no worker exits with a fatal code, nothing is respawned.
# On a GPU with LOCALMOE_RELOAD_EXPECT_HANDOVER=1 (the CUDA backend shares
# its weights, engine/backends/cuda_share.cu): the new worker imports the
# old one's weights instead of waiting ("weights imported from pid N"),
# the old one logs "weights handed over to pid N" when it exits, and the
# first request is served within LOCALMOE_RELOAD_TARGET_S (default 1) s.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use HTTP::Tiny;
use Cwd ();
use File::Spec;
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();

my $root = LocalMoE::Test::root_dir();
my $model = "$root/models/localmoe-kjv";

# On a GPU (the lead's device run): LOCALMOE_RELOAD_YAML names an engine
# YAML (e.g. bench/conf/mixtral-8x7b-dummy.yaml, gpu_memory_utilization
# 0.92: the GPU itself cannot hold two copies) and LOCALMOE_RELOAD_MODEL its
# served name; no emulated budget then.
my $gpu_yaml = $ENV{LOCALMOE_RELOAD_YAML};
my $served = $gpu_yaml ? ($ENV{LOCALMOE_RELOAD_MODEL} // 'mixtral-8x7b') : 'kjv';
my $handover = $gpu_yaml && $ENV{LOCALMOE_RELOAD_EXPECT_HANDOVER};
my $s;

if ($gpu_yaml) {
    my $text = LocalMoE::Test::slurp($gpu_yaml);
    my ($ydir) = $gpu_yaml =~ m{^(.*)/[^/]*$};
    $ydir = File::Spec->rel2abs($ydir // '.');
    # the YAML is copied to a temp dir: its relative model_name is made
    # absolute against its own directory
    $text =~ s{^(\s*model_name:\s*)"?([^"\s/][^"\s]*)"?\s*$}
              {my $p = "$ydir/$2"; -d $p ? "$1\"" . Cwd::abs_path($p) . "\"" : "$1\"$2\""}me;
    $s = LocalMoE::Test::prepare_server(yaml_raw => $text, wait_timeout => 600);
    $s->start;
    $LocalMoE::Test::CURRENT = $s;
} else {
    $s = LocalMoE::Test::prepare_server(
        vllm => { model_name => $model, served_model_name => 'kjv',
                  max_num_seqs => 32 },
        main_conf => "env MOE_CPU_MEMORY_LIMIT=100g;\n"
                     . "env MOE_CPU_MEMORY_FILE=__DIR__/device-memory;");
    my $conf = LocalMoE::Test::slurp($s->dir . '/nginx.conf');
    $conf =~ s/__DIR__/$s->{dir}/g;
    LocalMoE::Test::spew($s->dir . '/nginx.conf', $conf);
    $s->start;
    $LocalMoE::Test::CURRENT = $s;

    my $acct = $s->dir . '/device-memory';
    my ($held) = LocalMoE::Test::slurp($acct) =~ /^\d+ (\d+)$/m;
    ok($held && $held > 0, "the worker holds ${\ ($held // 0)} bytes of the budget");

    # a budget for one copy and a half
    my $limit = int(($held // 0) * 1.5);
    $conf =~ s/MOE_CPU_MEMORY_LIMIT=100g/MOE_CPU_MEMORY_LIMIT=$limit/;
    LocalMoE::Test::spew($s->dir . '/nginx.conf', $conf);
    ok($s->reload(timeout => 120), 'a first reload (no streams) puts the budget in force');
}

my $ht = HTTP::Tiny->new(timeout => 15);
my $url = $s->url;
my $body = LocalMoE::Test::json_encode({ model => $served, prompt => 'And God said',
                                         max_tokens => 2 });

my @st = map {
    LocalMoE::Test::sse_open('/v1/completions',
        { model => $served, prompt => "stream $_ of the reload", max_tokens => 200,
          ignore_eos => JSON::PP::true, stream => JSON::PP::true,
          stream_options => { include_usage => JSON::PP::true } })
} 1 .. 16;
my $deadline = time + 60;
for my $x (@st) {
    while (!$x->events && !$x->{eof} && time < $deadline) {
        $x->pump; sleep 0.01;
    }
}
my $running = grep { scalar($_->events) && !$_->done } @st;
is($running, 16, '16 streams are running when the reload is sent');

my $d = $s->dir;
my $t0 = time;
system(LocalMoE::Test::nginx_bin(), '-p', "$d/", '-c', "$d/nginx.conf", '-e',
       "$d/error.log", '-s', 'reload') == 0 or die "reload: $?";

my (%seen, %health, $first_ok, $bad, $slow);
$deadline = time + ($gpu_yaml ? 600 : 180);
while (time < $deadline) {
    $_->pump for @st;
    my $t = time;
    my $r = $ht->post("$url/v1/completions",
        { headers => { 'Content-Type' => 'application/json' }, content => $body });
    my $dt = time - $t;
    $slow++ if $r->{status} == 599;
    $seen{ $r->{status} }++;
    if ($r->{status} == 503) {
        my $h = $ht->get("$url/health");
        my $hj = LocalMoE::Test::json_decode($h->{content} // '') // {};
        $health{"$h->{status} " . ($hj->{status} // '?')}++;
        $bad++ unless ($r->{headers}{'retry-after'} // '') =~ /^[1-9]\d*$/
                      && $r->{content} =~ /"error"/;
    } elsif ($r->{status} == 200) {
        # the old worker answers until it stops accepting; the new one
        # answers 200 only once it has loaded
        my $log = $s->error_log;
        my $n = () = $log =~ /moe: serving "\Q$served\E"/g;
        if ($n >= ($gpu_yaml ? 2 : 3)) { $first_ok = time - $t0; last }
    } else {
        $bad++;
    }
    sleep 0.05;
}
ok(defined $first_ok, 'the new worker serves after the reload');
diag(sprintf 'reload under 16 streams: first request served by the new worker '
     . '%.2f s after the reload; answers meanwhile: %s', $first_ok // -1,
     join(', ', map { "$_ x$seen{$_}" } sort keys %seen));
ok(!$bad, 'meanwhile every answer was 200 or 503 with Retry-After and an error body');
ok(!$slow, 'no request hung (none timed out)');
if ($handover) {
    my $target = $ENV{LOCALMOE_RELOAD_TARGET_S} // 1;
    ok(defined $first_ok && $first_ok < $target,
       sprintf('weights handed over: first request %.2f s after the reload '
               . '(target < %s s)', $first_ok // -1, $target));
} else {
    ok(($seen{503} // 0) > 0, 'the new worker answered 503 while it waited for memory');
    ok($health{'503 loading'}, '... and /health said 503 "loading" meanwhile')
        or diag explain \%health;
}
is(scalar(grep { !/^(503 loading|200 ok)$/ } keys %health), 0,
   '... never anything but loading or ok') or diag explain \%health;

$_->read_all(180) for @st;
sub usage_tokens {
    my ($x) = @_;
    my ($u) = grep { $_->{usage} } $x->chunks;
    return $u ? $u->{usage}{completion_tokens} // 0 : 0;
}
my $ok = grep { $_->done && !$_->errors && ($_->finish_reason // '') eq 'length'
                && usage_tokens($_) == 200 } @st;
is($ok, 16, 'every stream finished with its 200 tokens: 0 dropped')
    or diag join "\n", map { $_->summary } @st;

my $log = $s->error_log;
if ($handover) {
    like($log, qr/weights imported from pid \d+/,
         'error.log: the new worker imported the old one\'s weights');
    # the old worker logs the hand-over when it exits, after its streams
    my $until = time + 30;
    while ($log !~ /weights handed over to pid \d+|no new worker took/
           && time < $until) {
        sleep 0.2;
        $log = $s->error_log;
    }
    like($log, qr/weights handed over to pid \d+ in [\d.]+ ms/,
         'error.log: the old worker handed its weights over');
    my ($grew) = $log =~ /(KV pool backed for \d+ of \d+ blocks[^\n]*)/;
    diag($grew // 'the KV pool has not grown to its full size yet');
} else {
    like($log, qr/waiting for memory held by the old worker/,
         'error.log: the new worker waited for the old one\'s memory');
}
unlike($log, qr/exited with fatal code|respawn/, 'error.log: no fatal exit, no respawn');

my ($st) = LocalMoE::Test::http(GET => '/health');
is($st, 200, '/health: 200 after the reload');

finish();
