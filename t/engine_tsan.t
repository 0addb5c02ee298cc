#!/usr/bin/perl
# The engine test under ThreadSanitizer (make tsan): the engine thread, the submit/event rings, the eventfd wake-ups and the hold hook; any data race report fails it.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/engine_tsan";
-x $bin or do { print "1..0 # SKIP $bin not built (run make tsan)\n"; exit 0 };
$ENV{TSAN_OPTIONS} = join ':', grep { length } $ENV{TSAN_OPTIONS} // '',
    'halt_on_error=1', 'exitcode=66';
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";
exec $bin or die "exec $bin: $!";
