#!/usr/bin/perl
# Quantized checkpoints (engine/model/quant.h): tools/quant_models.sh writes
# the tiny models in every layout (fp8 per tensor / block, compressed-tensors
# per channel, AWQ g32/g64/g128, GPTQ sym/asym with and without desc_act /
# g_idx) with their dequantized references and malformed copies into
# build/quant, then build/t/quant checks packing, dequantization, the CPU
# load of each against its reference (logits within 1e-4, greedy equal),
# the YAML quantization key and the refusals (t/unit/quant.c says what).
use strict; use warnings; use FindBin;
chdir "$FindBin::Bin/.." or die "chdir: $!";
my $bin = "build/t/quant";
-x $bin && -x "build/quantize"
    or do { print "1..0 # SKIP $bin or build/quantize not built (run make)\n"; exit 0 };
system("tools/quant_models.sh build/quant") == 0
    or do { print "1..1\nnot ok 1 - tools/quant_models.sh build/quant failed\n"; exit 1 };
$ENV{MOE_QUANT_DIR} = "build/quant";
exec $bin or die "exec $bin: $!";
