#!/usr/bin/perl
# POST /v1/models/switch (issue 9 item 5), on the CPU:
#   * admin key required (401 without it);
#   * only directories under moe_models_dir: "..", an absolute path and
#     control characters are 400, a symbolic link out of the directory is
#     403 (checked after realpath), a missing model 404;
#   * a switch while 16 streams run: the switch answers 200 once the new
#     model serves; every stream finishes on the old model ([DONE], every
#     chunk names the old model, no error, its full max_tokens): 0 dropped;
#     then the new model serves and /v1/models lists it;
#   * the old engine is destroyed after its last stream: /v1/stats/memory
#     shows engines.freed 1 and freed_weights_bytes > 0, retiring 0;
#   * a switch to a model that fails to load (a broken tokenizer.json)
#     answers with the reason in an OpenAI error body and leaves the
#     current model serving;
#   * with a memory budget that cannot hold both (MOE_CPU_MEMORY_LIMIT),
#     the old model is drained first and the answer says so.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Copy qw(copy);
use File::Temp qw(tempdir);
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();

my $root = LocalMoE::Test::root_dir();
my $md = tempdir('localmoe-models-XXXXXX', TMPDIR => 1, CLEANUP => 1);

sub copy_model {
    my ($from, $to) = @_;
    mkdir $to or die "mkdir $to: $!";
    opendir my $dh, $from or die $!;
    for my $f (grep { -f "$from/$_" } readdir $dh) {
        copy("$from/$f", "$to/$f") or die "copy $f: $!";
    }
}
copy_model("$root/models/localmoe-tiny", "$md/tiny");
copy_model("$root/models/localmoe-kjv", "$md/kjv");
copy_model("$root/models/localmoe-tiny", "$md/broken");
LocalMoE::Test::spew("$md/broken/tokenizer.json", '{ "model": [ broken');
symlink("$root/models/localmoe-kjv", "$md/escape") or die "symlink: $!";

my $admin = 'sk-admin-switch-test';
my %auth = (headers => { Authorization => "Bearer $admin" });

my $s = start_server(vllm => { model_name => "$md/tiny",
                               served_model_name => 'tiny',
                               max_num_seqs => 32 },
                     server => { admin_api_key => $admin, api_key => ['sk-user-key'] },
                     http_conf => "    moe_models_dir $md;");

sub req {
    my ($method, $path, $body) = @_;
    return http($method, $path, $body, %auth);
}

sub switch {
    my ($body, %o) = @_;
    return http(POST => '/v1/models/switch', $body, %auth, %o);
}

my ($st, undef, $j) = http(POST => '/v1/models/switch', { model_name => 'kjv' });
is($st, 401, 'switch without the admin key: 401');
($st, undef, $j) = http(POST => '/v1/models/switch', { model_name => 'kjv' },
                        headers => { Authorization => 'Bearer sk-user-key' });
is($st, 403, 'switch with a user key: 403');

for my $bad ([ '../tiny', 400 ], [ 'kjv/../../tiny', 400 ], [ "$md/kjv", 400 ],
             [ "kj\tv", 400 ], [ 'escape', 403 ], [ 'no-such-model', 404 ]) {
    ($st, undef, $j) = switch({ model_name => $bad->[0] });
    is($st, $bad->[1], "switch to '$bad->[0]': $bad->[1]");
    ok(ref $j eq 'HASH' && $j->{error}{message}, '... with an OpenAI error body')
        or diag explain $j;
}
($st) = req(POST => '/v1/completions', { model => 'tiny', prompt => 'hi', max_tokens => 2 });
is($st, 200, 'after the refused switches the old model serves');

# 16 streams, then the switch
my @st = map {
    LocalMoE::Test::sse_open('/v1/completions',
        { model => 'tiny', prompt => "stream $_", max_tokens => 120,
          ignore_eos => JSON::PP::true, stream => JSON::PP::true }, %auth)
} 1 .. 16;
# wait until every stream has its first event: they run on the old model
my $deadline = time + 60;
for my $x (@st) {
    while (!$x->events && !$x->{eof} && time < $deadline) {
        $x->pump; select undef, undef, undef, 0.01;
    }
}
is(scalar(grep { scalar $_->events } @st), 16, 'the 16 streams are running');

($st, undef, $j) = switch({ model_name => 'kjv', tensor_parallel_size => 1 });
is($st, 200, 'switch to kjv: 200') or diag explain $j;
is($j->{model}, 'kjv', '... the instance now serves kjv');
ok(!$j->{drained_first}, '... loaded beside the old model (no drain)');

$_->read_all(120) for @st;
my $ok = grep {
    my $x = $_;
    $x->done && !$x->errors && (grep { ($_->{model} // '') ne 'tiny' } $x->chunks) == 0
        && ($x->finish_reason // '') eq 'length'
} @st;
is($ok, 16, 'every stream finished on the old model: 0 dropped')
    or diag join "\n", map { $_->summary } @st;

($st, undef, $j) = req(GET => '/v1/models');
is_deeply([ map { $_->{id} } @{ $j->{data} } ], [ 'kjv' ], '/v1/models lists kjv');
($st, undef, $j) = req(POST => '/v1/completions',
                        { model => 'kjv', prompt => 'And God said', max_tokens => 4 });
is($st, 200, 'the new model serves');
($st) = req(POST => '/v1/completions', { model => 'tiny', prompt => 'x', max_tokens => 2 });
is($st, 404, 'the old name is gone: 404');

my $mem;
$deadline = time + 60;
while (time < $deadline) {
    (undef, undef, $mem) = req(GET => '/v1/stats/memory');
    last if ($mem->{engines}{freed} // 0) >= 1;
    select undef, undef, undef, 0.1;
}
is($mem->{engines}{freed}, 1, 'the old engine was destroyed after its last stream')
    or diag explain $mem;
ok(($mem->{engines}{freed_weights_bytes} // 0) > 0,
   "... its weights freed ($mem->{engines}{freed_weights_bytes} bytes)");
is($mem->{engines}{retiring}, 0, '... no engine left retiring');
like($s->error_log, qr/the old engine is destroyed, \d+ MiB of weights freed/,
     'error.log: the old engine destroyed');

# a failed switch keeps the current model
(undef, undef, $mem) = req(GET => '/v1/stats/performance');
my $failures = $mem->{instances}[0]{engines}{switch_failures};
($st, undef, $j) = switch({ model_name => 'broken' });
ok($st >= 400 && $st < 600, "switch to a model that fails to load: $st");
like($j->{error}{message} // '', qr/tokenizer\.json.*old model keeps serving/,
     '... the reason, and that the old model keeps serving') or diag explain $j;
($st) = req(POST => '/v1/completions', { model => 'kjv', prompt => 'x', max_tokens => 2 });
is($st, 200, '... and it does');
(undef, undef, $mem) = req(GET => '/v1/stats/performance');
is($mem->{instances}[0]{engines}{switch_failures}, $failures + 1,
   'stats: one more switch failure');
$s->stop;

# drain first: a budget for one model at a time
my $acct = "$md/memory-accounting";
$s = start_server(vllm => { model_name => "$md/kjv", served_model_name => 'kjv',
                            max_num_seqs => 8 },
                  server => { admin_api_key => $admin, api_key => ['sk-user-key'] },
                  main_conf => "env MOE_CPU_MEMORY_LIMIT=1g;\nenv MOE_CPU_MEMORY_FILE=$acct;",
                  http_conf => "    moe_models_dir $md;");
my ($held) = LocalMoE::Test::slurp($acct) =~ /^\d+ (\d+)$/m;
ok($held && $held > 0, "the budget counts the model ($held bytes)");
$s->stop;
$s = start_server(vllm => { model_name => "$md/kjv", served_model_name => 'kjv',
                            max_num_seqs => 8 },
                  server => { admin_api_key => $admin, api_key => ['sk-user-key'] },
                  main_conf => "env MOE_CPU_MEMORY_LIMIT=" . int($held * 1.5)
                               . ";\nenv MOE_CPU_MEMORY_FILE=$acct;",
                  http_conf => "    moe_models_dir $md;");
my @st2 = map {
    LocalMoE::Test::sse_open('/v1/completions',
        { model => 'kjv', prompt => "stream $_", max_tokens => 60,
          ignore_eos => JSON::PP::true, stream => JSON::PP::true }, %auth)
} 1 .. 4;
($st, undef, $j) = switch({ model_name => 'kjv' });
is($st, 200, 'switch with no room for both: 200') or diag explain $j;
ok($j->{drained_first}, '... the old model was drained first');
like($j->{message} // '', qr/drained first/, '... and the answer says so');
$_->read_all(120) for @st2;
is(scalar(grep { $_->done && !$_->errors } @st2), 4,
   '... the streams running on the old model finished');
like($s->error_log, qr/draining the old model first/, 'error.log says so too');

finish();
