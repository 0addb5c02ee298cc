#!/usr/bin/perl
# Packed weights of the CUDA backend, host side (engine/backends/qweights.h):
# tensor-parallel slices of fp8 / AWQ / GPTQ tensors (exact against the
# whole tensor's dequantization, refusals off the format's boundaries),
# the plan and layout sizes, and the plans of the tiny quantized
# checkpoints tools/quant_models.sh writes (t/unit/qweights.c says what).
use strict; use warnings; use FindBin;
chdir "$FindBin::Bin/.." or die "chdir: $!";
my $bin = "build/t/qweights";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
if (-x "build/quantize" && system("tools/quant_models.sh build/quant > /dev/null") == 0) {
    $ENV{MOE_QUANT_DIR} = "build/quant";
}
exec $bin or die "exec $bin: $!";
