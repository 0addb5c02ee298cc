#!/usr/bin/perl
# Several models in one worker (issue 9 item 4): two vllm_instances entries
# (models/localmoe-tiny and models/localmoe-kjv), each with its own engine:
#   * /v1/models lists both; /health reports each instance "ok", and
#     /health?model=NAME that one alone (404 for an unknown name);
#   * streams to both models at once all finish, each answered by the model
#     it named (the chunks' "model"), with the texts the models give alone
#     (greedy: the same prompt to the same model gives the same text);
#   * an unknown model is 404 model_not_found (OpenAI's answer);
#   * /metrics and /v1/stats/performance are labelled per instance
#     (model="..."), with each instance's own request counts;
#   * switching is off (501, naming moe_models_dir) without moe_models_dir;
#   * nginx -t refuses a GPU listed by two instances and a gpu_devices list
#     whose length is not tensor_parallel_size, naming engine.yaml:line.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();

my $root = LocalMoE::Test::root_dir();
my ($tiny, $kjv) = ("$root/models/localmoe-tiny", "$root/models/localmoe-kjv");
my @inst = ({ model_name => $tiny }, { model_name => $kjv });

my $s = start_server(vllm => { model_name => undef, max_num_seqs => 16 },
                     vllm_instances => \@inst);

my ($st, undef, $j) = http(GET => '/v1/models');
is($st, 200, 'GET /v1/models: 200');
is_deeply([ sort map { $_->{id} } @{ $j->{data} // [] } ], [ sort $tiny, $kjv ],
          '/v1/models lists both instances');

($st, undef, $j) = http(GET => '/health');
is($st, 200, '/health: 200 with both serving');
is_deeply([ map { $_->{status} } @{ $j->{instances} // [] } ], [ 'ok', 'ok' ],
          '/health: each instance ok');

($st, undef, $j) = http(GET => "/health?model=$kjv");
is($st, 200, '/health?model=: 200 for a serving instance');
is($j->{model}, $kjv, '... about that instance');
($st, undef, $j) = http(GET => '/health?model=nope');
is($st, 404, '/health?model= of an unknown model: 404');

# each model alone first (greedy), then both at once
my %alone;
for my $m ($tiny, $kjv) {
    my ($st, undef, $j) = http(POST => '/v1/completions',
        { model => $m, prompt => 'In the beginning', max_tokens => 12,
          temperature => 0, ignore_eos => JSON::PP::true });
    is($st, 200, "completion alone: $m");
    is($j->{model}, $m, '... answered by that model');
    $alone{$m} = $j->{choices}[0]{text};
}
isnt($alone{$tiny}, $alone{$kjv}, 'the two models give different texts');

my @reqs = map {
    my $m = $_ % 2 ? $kjv : $tiny;
    [ '/v1/completions', { model => $m, prompt => 'In the beginning',
                           max_tokens => 12, temperature => 0, stream => JSON::PP::true,
                           ignore_eos => JSON::PP::true } ]
} 0 .. 7;
my @st = sse_many(\@reqs, timeout => 120);
for my $i (0 .. $#st) {
    my $m = $reqs[$i][1]{model};
    my $x = $st[$i];
    ok($x->done && !$x->errors, "stream $i ($m) ends with [DONE], no framing error")
        or diag $x->summary;
    my @models = map { $_->{model} // '' } $x->chunks;
    ok(@models && !grep({ $_ ne $m } @models), "... every chunk names $m");
    is($x->text, $alone{$m}, '... the text the model gives alone');
}

($st, undef, $j) = http(POST => '/v1/completions',
                        { model => 'no-such-model', prompt => 'x' });
is($st, 404, 'unknown model: 404');
is($j->{error}{code}, 'model_not_found', '... code model_not_found');

# per-instance labels
my (undef, undef, $m) = http(GET => '/metrics');
for my $name ($tiny, $kjv) {
    my ($n) = $m =~ /^localmoe_requests_finished_total\{model="\Q$name\E"\} (\d+)$/m;
    ok(defined $n && $n >= 5, "/metrics: requests_finished_total{model=\"...\"} for $name ($n)")
        or diag $m;
    like($m, qr/^localmoe_instance_up\{model="\Q$name\E"\} 1$/m, '... instance_up 1');
}
my @help = $m =~ /^# HELP localmoe_requests_finished_total /mg;
is(scalar @help, 1, '/metrics: one HELP line per metric family');

($st, undef, $j) = http(GET => '/v1/stats/performance?model=' . $kjv);
is($j->{model}, $kjv, '/v1/stats/performance?model= picks the instance');
is(scalar @{ $j->{instances} // [] }, 2, '... and lists both instances');
($st, undef, $j) = http(GET => '/v1/stats/memory');
ok(($j->{instances}[0]{weights_bytes} // 0) > 0
   && ($j->{instances}[1]{weights_bytes} // 0) > 0,
   '/v1/stats/memory: each instance holds its own weights');
isnt($j->{instances}[0]{weights_bytes}, $j->{instances}[1]{weights_bytes},
     '... two different models');

($st, undef, $j) = http(POST => '/v1/models/switch', { model_name => 'x' });
is($st, 501, 'switch without moe_models_dir: 501');
like($j->{error}{message} // '', qr/moe_models_dir/, '... naming the directive');

$s->stop;

# nginx -t: device conflicts, with the line
sub line_of {
    my ($s, $re) = @_;
    my @l = split /\n/, $s->{yaml_text};
    for my $i (0 .. $#l) { return $i + 1 if $l[$i] =~ $re }
    return 0;
}
my $p = prepare_server(vllm => { model_name => undef },
    vllm_instances => [ { model_name => $tiny, gpu_devices => [0, 1] },
                        { model_name => $kjv, gpu_devices => [1, 2] } ]);
my ($rc, $out) = nginx_test($p);
isnt($rc, 0, 'nginx -t: a GPU listed by two instances fails');
like($out, qr/engine\.yaml:\d+: .*GPU 1 is already used/, '... naming the line and GPU')
    or diag $out;

$p = prepare_server(vllm => { model_name => undef },
    vllm_instances => [ { model_name => $tiny, gpu_devices => [0, 1],
                          tensor_parallel_size => 4 } ]);
($rc, $out) = nginx_test($p);
isnt($rc, 0, 'nginx -t: gpu_devices count != tensor_parallel_size fails');
my $line = line_of($p, qr/gpu_devices/);
like($out, qr/engine\.yaml:$line: gpu_devices has 2 entries but tensor_parallel_size is 4/,
     "... naming engine.yaml:$line") or diag $out;

finish();
