#!/usr/bin/perl
# The test library's own helpers (t/lib/LocalMoE/Test.pm): free_port never
# hands out the same port twice in one process (a test that asks for
# several ports for one nginx config got a port twice and nginx merged two
# server blocks: "conflicting server name", CI 2026-12-04), and every port
# it returns can be bound.
use strict; use warnings; use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use LocalMoE::Test;

my %seen;
my ($dup, $unbindable) = (0, 0);
for (1 .. 500) {
    my $p = free_port();
    $dup++ if $seen{$p}++;
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $p,
                                  Proto => 'tcp', Listen => 1,
                                  ReuseAddr => 1);
    $unbindable++ unless $s;
    close $s if $s;
}
is($dup, 0, "free_port: 500 calls, no port returned twice");
is($unbindable, 0, "free_port: every port returned could be bound");
done_testing();
