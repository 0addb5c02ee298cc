#!/usr/bin/perl
# build/t/engine again under CPU contention: pinned to one core (taskset)
# with a busy loop pinned beside it on the same core, so the engine thread,
# the test's own thread and the loop take turns on one CPU.  The engine
# test forces every batch composition it checks (moe_engine_hold) and its
# outputs never depend on timing, so it must pass here exactly as on an
# idle machine; a test that relies on thread timing shows up here.  The
# busy loop ends by itself after 10 minutes if this script dies, and is
# killed as soon as the run ends.  Skips when taskset is missing.
use strict; use warnings; use FindBin;
use POSIX ();

my $bin = "$FindBin::Bin/../build/t/engine";
-x $bin or do { print "1..0 # SKIP $bin not built (run make)\n"; exit 0 };
my ($taskset) = grep { -x "$_/taskset" } split /:/, $ENV{PATH} // '';
defined $taskset
    or do { print "1..0 # SKIP taskset not found (util-linux)\n"; exit 0 };
$taskset .= '/taskset';
$ENV{MOE_SRCDIR} //= "$FindBin::Bin/..";

# the first CPU this process may run on (not always 0 in a container)
my $cpu;
if (open my $fh, '<', '/proc/self/status') {
    while (<$fh>) {
        ($cpu) = /^Cpus_allowed_list:\s*(\d+)/ and last;
    }
}
$cpu //= 0;
system($taskset, '-c', $cpu, 'true') == 0
    or do { print "1..0 # SKIP taskset -c $cpu does not work here\n"; exit 0 };

my $busy = fork // die "fork: $!";
if (!$busy) {
    open STDOUT, '>', '/dev/null';
    exec $taskset, '-c', $cpu, $^X, '-e',
        'my $end = time + 600; 1 while time < $end'
        or POSIX::_exit(127);
}
END { if ($busy) { kill 'KILL', $busy; waitpid $busy, 0; } }

print "# $bin pinned to cpu $cpu beside a busy loop (pid $busy)\n";
my $rc = system $taskset, '-c', $cpu, $bin;
kill 'KILL', $busy;
waitpid $busy, 0;
$busy = 0;
exit($rc == -1 ? 127 : $rc & 127 ? 128 + ($rc & 127) : $rc >> 8);
