#!/usr/bin/perl
# Runs build/t/guided: guided decoding's compilers (JSON Schema, json_object,
# regex, GBNF, choice) accept and reject as their languages say, bad guides
# are refused by name, masks equal a brute-force scan of the vocabulary, and
# guided generation on the embedded models yields accepted text.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/guided";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
