#!/usr/bin/perl
# Serving quantized checkpoints through nginx (engine/model/quant.h): an
# AWQ (group 32) copy of the tiny model made by build/quantize, served with
# `quantization: awq`, answers a greedy completion with exactly the text
# of its dequantized f32 reference served the same way, and so does a
# compressed-tensors pack-quantized int4 copy (asymmetric, group 32,
# actorder group) served with `quantization: compressed-tensors`;
# `quantization: fp8` quantizes the bf16 tiny model at load and serves it;
# nginx -t
# refuses `quantization: gptq` for the AWQ checkpoint, naming both methods,
# and `quantization: awq` for the unquantized model.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempdir);
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();
my $root = LocalMoE::Test::root_dir();
my $q = "$root/build/quantize";
plan skip_all => "$q not built (run make)" unless -x $q;

my $dir = tempdir('localmoe-quant-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
is(system($q, '--in', model_dir(), '--out', "$dir/awq", '--ref',
          "$dir/awq.ref", '--format', 'awq', '--group', '32'), 0,
   'build/quantize wrote an AWQ g32 copy and its reference');
is(system($q, '--in', model_dir(), '--out', "$dir/ct4", '--ref',
          "$dir/ct4.ref", '--format', 'ct-int4', '--group', '32',
          '--desc-act'), 0,
   'build/quantize wrote a compressed-tensors int4 copy and its reference');

my $req = { prompt => 'Hello there', max_tokens => 8, temperature => 0,
            ignore_eos => JSON::PP::true };
my %text;
for my $m (['awq', "$dir/awq", 'awq', qr/quantization awq \(4-bit weights\)/],
           ['reference', "$dir/awq.ref", undef, qr/loading model from/],
           ['ct-int4', "$dir/ct4", 'compressed-tensors',
            qr/quantization compressed-tensors \(4-bit weights\)/],
           ['ct-int4 reference', "$dir/ct4.ref", undef,
            qr/loading model from/],
           ['fp8 at load', model_dir(), 'fp8',
            qr/quantization fp8 at load, per channel \(8-bit weights\)/])
{
    my ($what, $path, $quant, $log) = @$m;
    my $s = start_server(vllm => { model_name => $path,
                                   defined $quant ? (quantization => $quant)
                                                  : () });
    my ($st, undef, $j) = http(POST => '/v1/completions',
                               { %$req, model => model_id() });
    is($st, 200, "$what: completion 200") or diag explain $j;
    is($j->{usage}{completion_tokens}, 8, "$what: 8 tokens");
    $text{$what} = $j->{choices}[0]{text} // '';
    like(LocalMoE::Test::slurp($s->dir . '/error.log'), $log,
         "$what: the engine's log says how it loaded it");
    stop_server($s);
}
is($text{awq}, $text{reference},
   'the AWQ model says exactly what its dequantized reference says');
is($text{'ct-int4'}, $text{'ct-int4 reference'},
   'the compressed-tensors int4 model says exactly what its dequantized '
   . 'reference says');

my $s = prepare_server(vllm => { model_name => "$dir/awq",
                                 quantization => 'gptq' });
my ($rc, $out) = nginx_test($s);
isnt($rc, 0, 'nginx -t: quantization gptq for an AWQ checkpoint fails');
like($out, qr/quantization 'gptq' was requested, but the checkpoint's quantization_config quant_method is 'awq'/,
     '... naming both methods') or diag $out;
$s = prepare_server(vllm => { quantization => 'awq' });
($rc, $out) = nginx_test($s);
isnt($rc, 0, 'nginx -t: quantization awq for an unquantized model fails');
like($out, qr/quantization 'awq' was requested, but the checkpoint is not quantized/,
     '... saying so') or diag $out;
$s = prepare_server(vllm => { model_name => "$dir/awq",
                              quantization => 'awq' });
($rc, $out) = nginx_test($s);
is($rc, 0, 'nginx -t: quantization awq for the AWQ checkpoint passes')
    or diag $out;

finish();
