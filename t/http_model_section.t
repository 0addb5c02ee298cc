#!/usr/bin/perl
# The seed's model: section against the model's own config.json (issue 9
# item 6c): keys that agree are silent; keys that disagree are [warn]
# lines and the model's value is used; top_k_experts overrides the routing
# only when it differs from the model's, saying so at warn level, and
# /v1/models shows the top-k in effect; a dense model is told the expert
# keys are ignored, not that "the model says 1".
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

sub model_entry {
    my (undef, undef, $j) = http(GET => '/v1/models');
    return ref $j eq 'HASH' ? $j->{data}[0] // {} : {};
}

# log lines of this server about the model: section
sub section_lines {
    my ($s) = @_;
    return grep { /model\.(num_experts|top_k_experts|hidden_size|
                          intermediate_size|max_sequence_length)/x }
        split /\n/, $s->error_log;
}

# localmoe-tiny: Mixtral, 8 experts, top-2, hidden 64, ffn 128, 2048 pos
my $s = start_server(model => { num_experts => 8, top_k_experts => 2,
                                hidden_size => 64, intermediate_size => 128,
                                max_sequence_length => 2048 });
my $m = model_entry();
is($m->{top_k_experts}, 2, 'agreeing keys: /v1/models top_k_experts 2');
is($m->{num_experts}, 8, '... num_experts 8');
my @l = section_lines($s);
is(scalar @l, 0, 'agreeing keys: nothing logged') or diag join "\n", @l;
stop_server($s);

$s = start_server(model => { num_experts => 4, top_k_experts => 1,
                             hidden_size => 768 });
$m = model_entry();
is($m->{top_k_experts}, 1, 'top_k_experts 1: /v1/models shows the override');
@l = section_lines($s);
ok((grep { /\[warn\].*model\.top_k_experts 1 overrides the model's routing/
            && /1 of 8 experts.*trained with 2/ } @l),
   'the override is a [warn] line naming both top-ks') or diag join "\n", @l;
ok((grep { /\[warn\].*model\.hidden_size is 768 but the model's/
            && /config\.json says 64/ } @l), 'hidden_size that disagrees: [warn]');
ok((grep { /\[warn\].*model\.num_experts is 4 .* says 8/ } @l),
   'num_experts that disagrees: [warn]');
my ($st, undef, $j) = http(POST => '/v1/completions',
    { model => model_id(), prompt => 'Hi', max_tokens => 3 });
is($st, 200, 'serves with the override');
stop_server($s);

# a dense model
$s = start_server(vllm => { model_name => root_dir()
                                           . '/t/data/models/llama-gqa' },
                  model => { num_experts => 8, top_k_experts => 2 });
$m = model_entry();
is($m->{num_experts}, 1, 'dense: /v1/models num_experts 1');
is($m->{top_k_experts}, 1, 'dense: top_k_experts 1 (the key is ignored)');
@l = section_lines($s);
ok((grep { /\[warn\].*model\.num_experts \(8\) is ignored: .* dense/ } @l),
   'dense: num_experts is ignored, said so') or diag join "\n", @l;
ok((grep { /\[warn\].*model\.top_k_experts \(2\) is ignored: .* dense/ } @l),
   'dense: top_k_experts is ignored, said so');
ok(!(grep { /says 1/ } @l), 'dense: not told "the model says 1"');

finish();
