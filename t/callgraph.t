#!/usr/bin/perl
# File-level call graph: no two object files of engine/ or of the nginx
# module call each other in a loop (tools/callgraph.sh --all over
# build/engine/**/*.o and the module's objects), and the tool itself finds a
# planted two-file cycle and passes a chain.
use strict; use warnings; use FindBin;
use File::Temp qw(tempdir);
use Test::More;

chdir "$FindBin::Bin/.." or die "chdir: $!";
my $tool = "tools/callgraph.sh";
my @objs = glob("build/engine/text/*.o");
plan skip_all => "build/engine/text/*.o not built (run make)" unless @objs;

# the tool on planted objects: a.c <-> b.c loop, then a chain c -> d
my $dir = tempdir(CLEANUP => 1);
my %src = (
    a => "int b_fn(void);\nint a_fn(void) { return b_fn() + 1; }\n",
    b => "int a_fn(void);\nint b_fn(void) { return 2; }\n"
       . "int b_back(void) { return a_fn(); }\n",
    c => "int d_fn(void);\nint c_fn(void) { return d_fn(); }\n",
    d => "int d_fn(void) { return 4; }\n",
);
for my $n (sort keys %src) {
    open my $f, '>', "$dir/$n.c" or die "$dir/$n.c: $!";
    print $f $src{$n};
    close $f;
    system("cc -c -o $dir/$n.o $dir/$n.c") == 0 or die "cc $n.c failed";
}
my $out = `$tool $dir/a.o $dir/b.o 2>&1`;
is($? >> 8, 1, "a planted a.o <-> b.o loop: exit status 1");
like($out, qr/cycle: .*a\.o .*b\.o/, "the loop is printed with both files");
like($out, qr/b\.o -> .*a\.o \(a_fn\)/, "the back edge names its symbol");
$out = `$tool $dir/c.o $dir/d.o 2>&1`;
is($? >> 8, 0, "a chain c.o -> d.o: exit status 0 ($out)");

# the real objects
my @mod = glob("build/nginx/objs/addon/ngx_moe_module/*.o");
ok(@mod >= 5, "the module's objects are there (" . scalar(@mod) . ")");
$out = `$tool --all 2>&1`;
is($? >> 8, 0, "engine/ and ngx_moe_module/ objects: no file loop");
diag($out) if $?;
done_testing();
