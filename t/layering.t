#!/usr/bin/perl
# Checks the include graph of the sources: module -> moe.h -> engine rooms ->
# backends -> kernels, with no arrow back; only engine/backends/ knows
# whether the build has CUDA (cuda_backend.h, MOE_HAVE_CUDA).
#   * ngx_moe_module/ includes nginx headers and the public <moe.h>, nothing
#     else of the engine's;
#   * engine/ never includes an ngx_*.h;
#   * kernels/ includes only its own headers (no moe.h, nothing of engine/);
#   * each engine room includes only the rooms below it (table %allowed);
#   * only engine/backends/ includes kernels/ headers.
# A "#include" that breaks a rule fails with file:line and the rule.
use strict; use warnings; use FindBin;
use File::Find;
use Test::More;

my $root = "$FindBin::Bin/..";

# room => rooms it may include ("model" means engine/model/...); util/
# includes nothing of the engine (its helpers are the rooms' common base)
my %allowed = (
    util     => [],
    config   => [],
    text     => [qw(text util)],
    model    => [qw(model util)],
    sampling => [qw(sampling guided)],
    guided   => [qw(guided text util)],
    backends => [qw(backends model sampling)],
    sched    => [qw(sched backends model sampling text guided)],
    cli      => [qw(model backends sampling sched text config util)],
    include  => [],
);

my %kernel_hdr;
opendir(my $kd, "$root/kernels") or die "kernels/: $!";
$kernel_hdr{$_} = 1 for grep { /\.(h|cuh)$/ } readdir $kd;
closedir $kd;

my @files;
find(sub { push @files, $File::Find::name if /\.(c|h|cu|cuh)$/ },
     "$root/engine", "$root/kernels", "$root/ngx_moe_module");

my (@bad, $n_inc);
for my $f (sort @files) {
    (my $rel = $f) =~ s{^\Q$root\E/}{};
    open(my $fh, '<', $f) or die "$f: $!";
    while (my $line = <$fh>) {
        next unless $line =~ /^\s*#\s*include\s*([<"])([^>"]+)[>"]/;
        my ($kind, $inc) = ($1, $2);
        my $where = "$rel:$.";
        $n_inc++;
        if ($rel =~ m{^ngx_moe_module/}) {
            next if $inc =~ /^ngx_/ || $inc eq 'moe.h';
            next if $kind eq '<' && $inc !~ m{^(text|model|sched|backends|sampling|config|util)/};
            push @bad, "$where: the module includes $inc (only ngx_*.h and moe.h)";
        } elsif ($rel =~ m{^kernels/}) {
            next if $kind eq '<';
            push @bad, "$where: kernels/ include $inc, which is not a kernels/ header"
                unless $kernel_hdr{$inc};
        } elsif ($rel =~ m{^engine/([a-z_]+)/}) {
            my $room = $1;
            # the engine reaches CUDA through the backend factory only
            push @bad, "$where: engine/$room includes $inc (only backends/ may)"
                if $inc eq 'backends/cuda_backend.h' && $room ne 'backends';
            if ($inc =~ /^ngx_/) {
                push @bad, "$where: the engine includes nginx header $inc";
                next;
            }
            next if $kind eq '<';
            next if $inc eq 'moe.h';
            if ($inc =~ m{^([a-z_]+)/}) {
                my $to = $1;
                my $ok = $to eq $room
                         || grep { $_ eq $to } @{ $allowed{$room} || [] };
                push @bad, "$where: engine/$room includes $inc (room $to is not below $room)"
                    unless $ok;
            } elsif ($kernel_hdr{$inc}) {
                push @bad, "$where: engine/$room includes kernel header $inc (only backends/ may)"
                    unless $room eq 'backends';
            } else {
                push @bad, "$where: $inc is not room-qualified (write \"room/name.h\")";
            }
        }
    }
    close $fh;
}

# MOE_HAVE_CUDA (the build has CUDA) is tested only inside engine/backends/
my @cuda_ifdef;
for my $f (sort grep { m{/engine/} } @files) {
    (my $rel = $f) =~ s{^\Q$root\E/}{};
    next if $rel =~ m{^engine/backends/};
    open(my $fh, '<', $f) or die "$f: $!";
    while (my $line = <$fh>) {
        push @cuda_ifdef, "$rel:$." if $line =~ /\bMOE_HAVE_CUDA\b/;
    }
    close $fh;
}
ok(!@cuda_ifdef, "MOE_HAVE_CUDA only in engine/backends/ (the factory)")
    or diag(join("\n", @cuda_ifdef));

ok($n_inc > 100, "scanned the includes of engine/, kernels/ and the module ($n_inc)");
ok(!@bad, "no include breaks the layering") or diag(join("\n", @bad));

# the rule table itself must not allow a cycle between rooms
my (%state, @cycle);
my $visit;
$visit = sub {
    my ($r, @path) = @_;
    return if ($state{$r} // 0) == 2;
    if (($state{$r} // 0) == 1) { @cycle = (@path, $r); return; }
    $state{$r} = 1;
    $visit->($_, @path, $r) for grep { $_ ne $r } @{ $allowed{$r} || [] };
    $state{$r} = 2;
};
$visit->($_) for sort keys %allowed;
ok(!@cycle, "the room table has no cycle") or diag(join(' -> ', @cycle));

done_testing();
