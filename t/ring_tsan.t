#!/usr/bin/perl
# The ring stress test under ThreadSanitizer (make tsan): any data race report fails it.
use strict; use warnings; use FindBin;
my $bin = "$FindBin::Bin/../build/t/ring_tsan";
-x $bin or do { print "1..0 # SKIP $bin not built (run make tsan)\n"; exit 0 };
# halt_on_error makes TSan exit 66 at the first report; prove sees the
# non-zero exit status (and a short plan) as a failure.
$ENV{TSAN_OPTIONS} = join ':', grep { length } $ENV{TSAN_OPTIONS} // '',
    'halt_on_error=1', 'exitcode=66';
exec $bin, '200000' or die "exec $bin: $!";
