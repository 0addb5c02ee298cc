#!/usr/bin/perl
# Tool calls in the engine: output parsers (whole and streamed), the parser
# per model family, prompts with tools and structured messages.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/toolcall";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
chdir "$FindBin::Bin/.." or die "chdir: $!";
exec $bin or die "exec $bin: $!";
