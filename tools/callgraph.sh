#!/usr/bin/env bash
# File-level call graph of compiled objects, from their symbol tables:
# file A -> file B when A.o uses a global symbol that B.o defines.  Prints
# every cycle (each strongly connected set of files, and for each file in it
# the files it calls inside the set) and exits 1 when there is one, 0 when
# the graph is a DAG, 2 on a usage error.
#
#   tools/callgraph.sh                 engine/text/ objects (build/engine/text)
#   tools/callgraph.sh --all           all of engine/ and ngx_moe_module/
#   tools/callgraph.sh [-v] OBJ...     these objects
#   -v                                 also print every edge
#
# Objects whose source file (engine/X.c or .cu, ngx_moe_module/X.c) no
# longer exists are left out: a stale object from a removed file must not
# hide or invent a cycle.  Run after `make`.
set -euo pipefail
cd "$(dirname "$0")/.."

verbose=0
objs=()
mode=text
while [ $# -gt 0 ]; do
    case "$1" in
    -v) verbose=1 ;;
    --all) mode=all ;;
    --text) mode=text ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "callgraph: unknown option $1" >&2; exit 2 ;;
    *) objs+=("$1") ;;
    esac
    shift
done
if [ ${#objs[@]} -eq 0 ]; then
    if [ "$mode" = all ]; then
        mapfile -t objs < <(find build/engine build/nginx/objs/addon \
                                 -name '*.o' 2>/dev/null | sort)
    else
        mapfile -t objs < <(find build/engine/text -name '*.o' 2>/dev/null \
                            | sort)
    fi
fi
live=()
for o in "${objs[@]}"; do
    case "$o" in
    build/nginx/objs/addon/ngx_moe_module/*)
        src="ngx_moe_module/$(basename "${o%.o}").c" ;;
    build/*) src="${o#build/}"; src="${src%.o}" ;;
    *) src="${o%.o}" ;;
    esac
    if [ -e "$src.c" ] || [ -e "$src.cu" ] || [ -e "$src" ]; then
        live+=("$o")
    fi
done
if [ ${#live[@]} -eq 0 ]; then
    echo "callgraph: no objects (run make first)" >&2
    exit 2
fi

for o in "${live[@]}"; do
    nm -g --defined-only "$o" | awk -v f="$o" 'NF >= 3 { print "D", f, $3 }'
    nm -u "$o" | awk -v f="$o" '{ print "U", f, $NF }'
done | perl -e '
    my $verbose = shift;
    my (%def, %use, %files);
    while (<STDIN>) {
        my ($k, $f, $s) = split;
        $f =~ s{^build/(nginx/objs/addon/)?}{};
        $files{$f} = 1;
        if ($k eq "D") { $def{$s} = $f } else { push @{$use{$f}}, $s }
    }
    my %edge;
    for my $f (keys %use) {
        for my $s (@{$use{$f}}) {
            my $g = $def{$s};
            next if !defined $g || $g eq $f;
            $edge{$f}{$g}{$s} = 1;
        }
    }
    # Tarjan strongly connected components
    my ($idx, @stack, %on, %index, %low, @scc) = (0);
    my $visit;
    $visit = sub {
        my $v = shift;
        $index{$v} = $low{$v} = $idx++;
        push @stack, $v; $on{$v} = 1;
        for my $w (sort keys %{$edge{$v} || {}}) {
            if (!defined $index{$w}) {
                $visit->($w);
                $low{$v} = $low{$w} if $low{$w} < $low{$v};
            } elsif ($on{$w}) {
                $low{$v} = $index{$w} if $index{$w} < $low{$v};
            }
        }
        if ($low{$v} == $index{$v}) {
            my @c;
            while (1) { my $w = pop @stack; $on{$w} = 0; push @c, $w;
                        last if $w eq $v }
            push @scc, [sort @c] if @c > 1;
        }
    };
    for my $v (sort keys %files) { $visit->($v) if !defined $index{$v} }
    my $nf = keys %files;
    if ($verbose) {
        for my $f (sort keys %edge) {
            for my $g (sort keys %{$edge{$f}}) {
                print "$f -> $g (", join(" ", sort keys %{$edge{$f}{$g}}),
                      ")\n";
            }
        }
    }
    if (!@scc) { print "callgraph: $nf files, no cycle\n"; exit 0 }
    for my $c (@scc) {
        my %in = map { $_ => 1 } @$c;
        print "cycle: ", join(" ", @$c), "\n";
        for my $f (@$c) {
            for my $g (sort grep { $in{$_} } keys %{$edge{$f} || {}}) {
                my @s = sort keys %{$edge{$f}{$g}};
                my $more = @s > 4 ? " ..." : "";
                print "  $f -> $g (", join(" ", @s[0 .. ($#s < 3 ? $#s : 3)]),
                      "$more)\n";
            }
        }
    }
    print "callgraph: $nf files, ", scalar(@scc), " cycle(s)\n";
    exit 1;
' "$verbose"
