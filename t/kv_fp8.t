#!/usr/bin/perl
# The fp8 KV cache option: the YAML key, the CPU backend's e4m3 rounding,
# the checkpoint's per-layer scales (copies of the tiny model written by
# build/quantize --kv-scales into build/kv_fp8: the three namings and
# three malformed ones).
use strict; use warnings; use FindBin;
my $root = "$FindBin::Bin/..";
my $bin = "$root/build/t/kv_fp8";
my $q = "$root/build/quantize";
-x $bin && -x $q
    or do { print "1..0 # SKIP $bin or $q not built (run make)\n"; exit 0 };
my $out = "$root/build/kv_fp8";
my $tiny = "$root/models/localmoe-tiny";
my @models = (
    [ 'fp8-kv', '--format fp8-tensor --kv-scales 0.6,0.35' ],
    [ 'ct-fp8-kv-output', '--format ct-fp8 --kv-scales 0.6,0.35,output' ],
    [ 'awq-kv-one', '--format awq --group 32 --kv-scales 0.75,1,kv' ],
    [ 'bad-kv-missing', '--format fp8-tensor --kv-scales 0.6,0.35 --corrupt kv-missing' ],
    [ 'bad-kv-perhead', '--format fp8-tensor --kv-scales 0.6,0.35 --corrupt kv-perhead' ],
    [ 'bad-kv-neg', '--format fp8-tensor --kv-scales 0.6,0.35 --corrupt kv-neg' ],
);
mkdir $out;
for my $m (@models) {
    system("$q --in $tiny --out $out/$m->[0] $m->[1]") == 0
        or do { print "1..1\nnot ok 1 - build/quantize $m->[0] failed\n"; exit 1 };
}
$ENV{MOE_SRCDIR} //= $root;
$ENV{MOE_KV_MODELS} = $out;
exec $bin or die "exec $bin: $!";
