#!/usr/bin/perl
# A model that cannot be loaded says so (issue 9 item 6a):
#   * what the master can check before forking fails "nginx -t" with the
#     engine YAML's file:line and the reason: a missing model directory, a
#     config.json that does not parse, a safetensors file cut short;
#   * a model that passes those checks but fails in the worker (here a
#     tokenizer.json that is not JSON, which only the worker parses) leaves
#     the worker up: /health answers 503 {"status":"failed","reason"} and
#     every API request gets 503 with the reason in an OpenAI error body,
#     at once, again and again (no hang, no worker exit).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use File::Copy qw(copy);
use File::Temp qw(tempdir);
use Time::HiRes qw(time);
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();

# a fresh copy of the default model, spoilt by $spoil->($dir)
sub model_copy {
    my ($spoil) = @_;
    my $d = tempdir('localmoe-bad-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    opendir my $dh, model_dir() or die $!;
    for my $f (grep { -f model_dir() . "/$_" } readdir $dh) {
        copy(model_dir() . "/$f", "$d/$f") or die "copy $f: $!";
    }
    $spoil->($d);
    return $d;
}

sub yaml_line_of {
    my ($s, $key) = @_;
    my @l = split /\n/, slurp($s->dir . '/engine.yaml');
    for my $i (0 .. $#l) { return $i + 1 if $l[$i] =~ /^\s*\Q$key\E:/ }
    return 0;
}

# 1. nginx -t refuses what the master can see
my @bad = (
    [ 'a missing model directory',
      sub { '/nonexistent/localmoe-model' }, qr/not found/ ],
    [ 'a config.json that does not parse',
      sub { model_copy(sub { LocalMoE::Test::spew("$_[0]/config.json",
                                                  "{ not json") }) },
      qr/config\.json/ ],
    [ 'a safetensors file cut short',
      sub { model_copy(sub {
          my $f = "$_[0]/model.safetensors";
          truncate $f, (-s $f) - 4096 or die "truncate: $!" }) },
      qr/model\.safetensors/ ],
);
for my $b (@bad) {
    my ($what, $mk, $re) = @$b;
    my $s = prepare_server(vllm => { model_name => $mk->() });
    my $line = yaml_line_of($s, 'model_name');
    my ($rc, $out) = nginx_test($s);
    isnt($rc, 0, "nginx -t fails for $what");
    like($out, qr/engine\.yaml:$line: .*$re/,
         "... naming engine.yaml:$line (model_name) and the reason")
        or diag $out;
}

# 2. passes the master's checks, fails in the worker
my $dir = model_copy(sub {
    LocalMoE::Test::spew("$_[0]/tokenizer.json", "{ \"model\": [ broken") });
my $s = prepare_server(vllm => { model_name => $dir }, health_status => 503);
my ($rc, $out) = nginx_test($s);
is($rc, 0, 'nginx -t passes (the tokenizer is parsed by the worker)')
    or diag $out;
$s->start;
$LocalMoE::Test::CURRENT = $s;

# the worker loads the model on a thread: /health says "loading" (also a
# 503) until the load has failed; wait for that (a hang guard, not a
# speed limit: a loaded machine only takes longer)
my ($st, $j);
for (1 .. 600) {
    ($st, undef, $j) = http(GET => '/health');
    last unless ref $j eq 'HASH' && ($j->{status} // '') eq 'loading';
    select(undef, undef, undef, 0.1);
}
is($st, 503, '/health: 503');
is($j->{status}, 'failed', '/health: status failed (after loading)');
like($j->{reason} // '', qr/tokenizer\.json/, '/health: the reason')
    or diag explain $j;

for my $req ([ POST => '/v1/completions',
               { model => 'x', prompt => 'hi', max_tokens => 2 } ],
             [ POST => '/v1/chat/completions',
               { model => 'x', messages => [ { role => 'user',
                                               content => 'hi' } ] } ],
             [ GET => '/v1/models', undef ],
             [ POST => '/v1/completions',
               { model => 'x', prompt => 'again', max_tokens => 2 } ]) {
    my $t0 = time;
    my ($st, undef, $j) = http(@$req);
    my $dt = time - $t0;
    is($st, 503, "$req->[0] $req->[1]: 503");
    like(ref $j eq 'HASH' ? $j->{error}{message} // '' : '',
         qr/model failed to load: .*tokenizer\.json/,
         '... the OpenAI error body gives the reason') or diag explain $j;
    cmp_ok($dt, '<', 10, sprintf('... answered, not hung (%.3f s)', $dt));
}

$s->stop(quiet => 1);
my $log = $s->error_log;
like($log, qr/\[emerg\].*failed to start: .*tokenizer\.json/,
     'error.log: why the engine did not start');
unlike($log, qr/exited with fatal code|exited on signal|respawn/,
       'error.log: the worker did not exit or crash');

done_testing();
