package LocalMoE::Test;

# Harness for LocalMoE's HTTP tests (one .t file per feature).
#
# A test file starts Debian's /usr/sbin/nginx loading our dynamic module
# (build/nginx/objs/ngx_http_moe_module.so) with a generated nginx.conf and
# engine YAML in a temp prefix, on a free port; talks plain HTTP (HTTP::Tiny)
# and raw SSE (IO::Socket, own chunked decoder, so framing is checked byte for
# byte); and after stopping nginx checks error.log for alerts and crashes.
#
#   use lib "$FindBin::Bin/lib"; use LocalMoE::Test;
#   my $s = start_server(vllm => {max_model_len => 512});
#   my ($st, $h, $j) = http(POST => '/v1/completions', {...});
#   my $sse = sse('/v1/chat/completions', {..., stream => JSON::PP::true});
#   finish();          # stop nginx, check error.log, done_testing
#
# Core Perl only.  Environment overrides: LOCALMOE_NGINX (nginx binary),
# LOCALMOE_SO (module), LOCALMOE_MODEL (model dir), LOCALMOE_KEEP=1 (keep the
# temp prefix for inspection).

use strict;
use warnings;

use Exporter 'import';
use Test::More ();
use HTTP::Tiny;
use IO::Socket::INET;
use IO::Select;
use JSON::PP;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Time::HiRes qw(time sleep);
use POSIX qw(WNOHANG);

our @EXPORT = qw(
    start_server stop_server finish server prepare_server nginx_test
    http sse sse_open sse_many tokenize model_id
    json_encode json_decode yaml_text free_port slurp
    root_dir so_path model_dir nginx_bin node_sdk_run
);

my $ROOT  = abs_path(dirname(__FILE__) . '/../../..');
my $NGINX = $ENV{LOCALMOE_NGINX} || '/usr/sbin/nginx';
my $SO    = $ENV{LOCALMOE_SO}
    || "$ROOT/build/nginx/objs/ngx_http_moe_module.so";
my $MODEL = $ENV{LOCALMOE_MODEL} || "$ROOT/models/localmoe-tiny";

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;
my $HT   = HTTP::Tiny->new(timeout => 120, keep_alive => 1,
                           agent => 'localmoe-test/1');

our $CURRENT;          # the server the helpers talk to by default
my  @SERVERS;          # every server started, stopped again in END
my  $MODEL_ID;

$SIG{PIPE} = 'IGNORE';  # a peer that closes early must not kill the test

# node_sdk_run($server, $script): runs t/node/$script with the official
# OpenAI Node SDK (npm `openai`, installed once into build/npm-sdk; a
# failing install fails the test, no skip) against $server, relaying its
# TAP lines as tests ("sdk: ..."); the node process must exit 0 and run
# every test it planned.
sub node_sdk_run {
    my ($s, $script) = @_;
    my $sdk = "$ROOT/build/npm-sdk";

    if (!-f "$sdk/node_modules/openai/package.json") {
        system('mkdir', '-p', $sdk) == 0 or die "mkdir $sdk";
        require File::Copy;
        File::Copy::copy("$ROOT/t/node/package.json", "$sdk/package.json")
            or die "copy package.json: $!";
        my $out = `npm install --prefix '$sdk' --no-audit --no-fund 2>&1`;
        Test::More::is($? >> 8, 0, 'npm install openai')
            or Test::More::diag($out);
    }
    Test::More::ok(-f "$sdk/node_modules/openai/package.json",
                   'openai SDK installed');
    my ($ver) = slurp("$sdk/node_modules/openai/package.json")
        =~ /"version"\s*:\s*"([^"]+)"/;
    Test::More::diag("openai SDK " . ($ver // '?') . ", "
                     . `node --version`);

    local $ENV{BASE_URL}  = $s->url . '/v1';
    local $ENV{NODE_PATH} = "$sdk/node_modules";
    my $pid = open my $fh, '-|';
    defined $pid or die "fork: $!";
    if (!$pid) {
        open STDERR, '>&', \*STDOUT;
        exec 'node', "$ROOT/t/node/$script" or exit 127;
    }
    my ($planned, $seen) = (undef, 0);
    while (my $l = <$fh>) {
        chomp $l;
        if ($l =~ /^(not )?ok \d+ - (.*)$/) {
            $seen++;
            Test::More::ok(!$1, "sdk: $2");
        } elsif ($l =~ /^1\.\.(\d+)$/) {
            $planned = $1;
        } elsif ($l =~ /^# ?(.*)$/) {
            Test::More::diag("  $1");
        } else {
            Test::More::diag("node: $l");
        }
    }
    close $fh;
    Test::More::is($? >> 8, 0, "node $script exits 0");
    Test::More::ok(defined $planned && $planned == $seen && $seen > 0,
                   "node ran all its tests (" . ($planned // 'no plan')
                   . " planned, $seen seen)");
}

sub root_dir  { $ROOT }
sub so_path   { $SO }
sub model_dir { $MODEL }
sub nginx_bin { $NGINX }
sub server    { $CURRENT }

sub json_encode { $JSON->encode($_[0]) }
sub json_decode { my $j = eval { $JSON->decode($_[0]) }; $j }

sub slurp {
    my ($f) = @_;
    open my $fh, '<:raw', $f or return '';
    local $/;
    my $d = <$fh>;
    return defined $d ? $d : '';
}

sub spew {
    my ($f, $d) = @_;
    open my $fh, '>:raw', $f or die "write $f: $!";
    print $fh $d;
    close $fh or die "close $f: $!";
}

# A free TCP port on 127.0.0.1, never one this process was given before:
# the kernel may hand out a port it just freed again, and a test that asks
# for several ports for one nginx config must get distinct ones
# (t/test_lib.t).
my %FREE_PORT_GIVEN;

sub free_port {
    for (1 .. 1000) {
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
                                      LocalPort => 0, Proto => 'tcp',
                                      Listen => 1, ReuseAddr => 1)
            or die "bind: $!";
        my $p = $s->sockport;
        close $s;
        return $p unless $FREE_PORT_GIVEN{$p}++;
    }
    die "free_port: no new free port in 1000 tries";
}


# ------------------------------------------------------------------- YAML

sub yaml_scalar {
    my ($v) = @_;
    return 'null' unless defined $v;
    return $$v if ref $v eq 'SCALAR';            # \'raw text' goes verbatim
    return $v if $v =~ /\A-?\d+(\.\d+)?\z/ || $v =~ /\A(true|false|null)\z/;
    return $JSON->encode("$v");                  # a JSON string is YAML too
}

# Block-style YAML of a nested hash (sorted keys, so line numbers are stable).
sub yaml_text {
    my ($h, $ind) = @_;
    $ind //= 0;
    my $pad = '  ' x $ind;
    my $out = '';
    for my $k (sort keys %$h) {
        my $v = $h->{$k};
        if (ref $v eq 'HASH') {
            $out .= "$pad$k:\n" . yaml_text($v, $ind + 1);
        } elsif (ref $v eq 'ARRAY') {
            $out .= "$pad$k:\n";
            for my $e (@$v) {
                if (ref $e eq 'HASH') {
                    my $first = 1;
                    for my $ek (sort keys %$e) {
                        my $lead = $first ? "$pad  - " : "$pad    ";
                        $first = 0;
                        my $ev = $e->{$ek};
                        $out .= ref $ev eq 'ARRAY'
                            ? "$lead$ek: ["
                              . join(', ', map { yaml_scalar($_) } @$ev) . "]\n"
                            : "$lead$ek: " . yaml_scalar($ev) . "\n";
                    }
                } else {
                    $out .= "$pad  - " . yaml_scalar($e) . "\n";
                }
            }
        } else {
            $out .= "$pad$k: " . yaml_scalar($v) . "\n";
        }
    }
    return $out;
}

# Deep merge of $over into $base; an undef value deletes the key.
sub merge {
    my ($base, $over) = @_;
    for my $k (keys %$over) {
        my $v = $over->{$k};
        if (!defined $v) {
            delete $base->{$k};
        } elsif (ref $v eq 'HASH' && ref $base->{$k} eq 'HASH') {
            merge($base->{$k}, $v);
        } else {
            $base->{$k} = $v;
        }
    }
    return $base;
}


# ----------------------------------------------------------------- server

my %HARNESS_OPT = map { $_ => 1 } qw(main_conf http_conf server_conf
    location_conf yaml_raw wait_timeout worker_processes no_skip
    health_status);

# Write nginx.conf and engine.yaml into a fresh temp prefix; start nothing.
# Options: vllm/engine/model/... hashes deep-merged into the default YAML
# (undef deletes a key), yaml_raw (the YAML text itself), main_conf,
# http_conf, server_conf, location_conf (extra nginx directives),
# worker_processes, health_status (the /health status start() waits for:
# 200 unless given, 503 for a worker whose model failed to load).
sub prepare_server {
    my (%o) = @_;
    my $dir = tempdir('localmoe-t-XXXXXX', TMPDIR => 1,
                      CLEANUP => !$ENV{LOCALMOE_KEEP});
    chmod 0755, $dir;
    my $port = free_port();

    my %yaml = (
        engine => { backend => 'cpu' },
        vllm   => { model_name => $MODEL, max_model_len => 256,
                    max_num_seqs => 64, block_size => 16 },
    );
    my %extra = map { $_ => $o{$_} } grep { !$HARNESS_OPT{$_} } keys %o;
    merge(\%yaml, \%extra);
    my $ytext = defined $o{yaml_raw} ? $o{yaml_raw} : yaml_text(\%yaml);
    spew("$dir/engine.yaml", $ytext);

    my $user = $> == 0 ? "user root;\n" : '';
    my $wp   = $o{worker_processes} // 1;
    my $temp = join '', map { "    ${_}_temp_path $dir/${_}_temp;\n" }
        qw(client_body proxy fastcgi uwsgi scgi);
    my $conf = <<"EOF";
# generated by t/lib/LocalMoE/Test.pm
${user}worker_processes $wp;
master_process on;
error_log $dir/error.log info;
pid $dir/nginx.pid;
load_module $SO;
@{[ $o{main_conf} // '' ]}
events {
    worker_connections 1024;
}

http {
$temp    access_log off;
    moe_engine $dir/engine.yaml;
@{[ $o{http_conf} // '' ]}
    server {
        listen 127.0.0.1:$port;
@{[ $o{server_conf} // '' ]}
        location / {
            moe_api;
@{[ $o{location_conf} // '' ]}
        }
    }
}
EOF
    spew("$dir/nginx.conf", $conf);
    return bless { dir => $dir, port => $port, yaml => \%yaml,
                   yaml_text => $ytext, opts => \%o,
                   wait_timeout => $o{wait_timeout} // 30 },
        'LocalMoE::Test::Server';
}

sub skip_unless_built {
    return if -f $SO;
    Test::More::plan(skip_all => "$SO not built (run make)");
}

# Start nginx in the foreground of a forked child (own process group) and
# wait for GET /health to answer 200.  Fails the test file (and exits) when
# it does not come up.
sub start_server {
    my (%o) = @_;
    skip_unless_built() unless $o{no_skip};
    my $s = prepare_server(%o);
    $s->start;
    $CURRENT = $s;
    $MODEL_ID = undef;
    return $s;
}

sub stop_server {
    my ($s) = @_;
    $s //= $CURRENT;
    return unless $s;
    $s->stop;
}

# Stop every server (checking its error.log) and end the plan.
sub finish {
    $_->stop for grep { !$_->{stopped} } @SERVERS;
    Test::More::done_testing();
}

# nginx -t on a prepared server's config: (exit status, stderr+error.log).
sub nginx_test {
    my ($s) = @_;
    my $d = $s->{dir};
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        open STDOUT, '>', "$d/t.out";
        open STDERR, '>', "$d/t.err";
        exec $NGINX, '-t', '-p', "$d/", '-c', "$d/nginx.conf",
            '-e', "$d/error.log"
            or POSIX::_exit(127);
    }
    waitpid $pid, 0;
    my $rc = $? >> 8;
    return ($rc, slurp("$d/t.err") . slurp("$d/t.out")
                 . slurp("$d/error.log"));
}

END {
    my $rc = $?;
    for my $s (@SERVERS) {
        next if $s->{stopped};
        $s->stop(quiet => 1);
    }
    $? = $rc;
}


package LocalMoE::Test::Server;

use strict;
use warnings;
use Time::HiRes qw(time sleep);
use POSIX qw(WNOHANG);

sub url  { "http://127.0.0.1:$_[0]{port}" }
sub port { $_[0]{port} }
sub dir  { $_[0]{dir} }
sub error_log { LocalMoE::Test::slurp("$_[0]{dir}/error.log") }

sub start {
    my ($s) = @_;
    my $d = $s->{dir};
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        setpgrp(0, 0);
        open STDOUT, '>', "$d/stdout.log";
        open STDERR, '>', "$d/stderr.log";
        exec $NGINX, '-p', "$d/", '-c', "$d/nginx.conf", '-e',
            "$d/error.log", '-g', 'daemon off;'
            or POSIX::_exit(127);
    }
    $s->{pid} = $pid;
    push @SERVERS, $s;

    my $ht = HTTP::Tiny->new(timeout => 2);
    my $deadline = time + $s->{wait_timeout};
    my $why = 'timeout';
    while (time < $deadline) {
        if (waitpid($pid, WNOHANG) == $pid) {
            $why = "nginx exited with status " . ($? >> 8)
                . ($? & 127 ? " signal " . ($? & 127) : '');
            $s->{stopped} = 1;
            last;
        }
        my $r = $ht->get($s->url . '/health');
        if ($r->{status} == ($s->{opts}{health_status} // 200)) {
            $s->{started} = time;
            return $s;
        }
        $why = "timeout; last /health: $r->{status} "
            . substr($r->{content} // '', 0, 200);
        sleep 0.1;
    }
    Test::More::ok(0, "nginx with ngx_http_moe_module serves /health "
        . "within $s->{wait_timeout} s");
    Test::More::diag("$why\n--- nginx.conf\n" . LocalMoE::Test::slurp("$d/nginx.conf")
        . "--- engine.yaml\n$s->{yaml_text}--- stderr\n"
        . LocalMoE::Test::slurp("$d/stderr.log")
        . "--- error.log\n" . $s->error_log);
    $s->stop(quiet => 1);
    Test::More::done_testing();
    exit 1;
}

# `nginx -s reload` (the master re-reads nginx.conf and the engine YAML and
# starts a new worker); waits until the new worker logs that it serves
# ("moe: serving" once more in error.log) and /health answers 200.  Returns
# true on success, false after `timeout` seconds (default 30).
sub reload {
    my ($s, %o) = @_;
    my $d = $s->{dir};
    my $count = () = $s->error_log =~ /moe: serving/g;
    system($NGINX, '-p', "$d/", '-c', "$d/nginx.conf", '-e',
           "$d/error.log", '-s', 'reload') == 0 or return 0;
    my $ht = HTTP::Tiny->new(timeout => 2);
    my $deadline = time + ($o{timeout} // 30);
    while (time < $deadline) {
        my $now = () = $s->error_log =~ /moe: serving/g;
        if ($now > $count) {
            my $r = $ht->get($s->url . '/health');
            return 1 if $r->{status} == 200;
        }
        sleep 0.1;
    }
    return 0;
}

# SIGQUIT (graceful), SIGKILL to the process group after 30 s (a hang
# guard: on a loaded machine the engine's threads take what they take to
# join; the time is printed, not judged); then check that nginx exited by
# itself and error.log holds no alert or crash.
sub stop {
    my ($s, %o) = @_;
    return if $s->{stopped}++;
    my $pid = $s->{pid};
    kill 'QUIT', $pid;
    my $t_quit = time;
    my $deadline = $t_quit + 30;
    my $exited = 0;
    while (time < $deadline) {
        if (waitpid($pid, WNOHANG) == $pid) { $exited = 1; last }
        sleep 0.05;
    }
    if (!$exited) {
        kill 'KILL', -$pid;
        waitpid $pid, 0;
    }
    # workers are in the group too; make sure none is left behind
    kill 'KILL', -$pid if kill 0, -$pid;
    return if $o{quiet};

    Test::More::ok($exited, sprintf('nginx exits by itself after SIGQUIT '
                                    . '(%.2f s)', time - $t_quit));
    my @bad;
    my $log = $s->error_log;
    for my $l (split /\n/, $log) {
        push @bad, $l if $l =~ /\[(alert|emerg|crit)\]|AddressSanitizer
            |LeakSanitizer|segfault|exited\ on\ signal|core\ dumped/x;
    }
    for my $l (split /\n/, LocalMoE::Test::slurp("$s->{dir}/stderr.log")) {
        push @bad, "stderr: $l" if $l =~ /Sanitizer|segfault|runtime error/;
    }
    Test::More::ok(!@bad, 'error.log: no alert/emerg/crit/crash')
        or Test::More::diag(join "\n", @bad[0 .. ($#bad > 40 ? 40 : $#bad)]);
}


package LocalMoE::Test;

# ------------------------------------------------------------------- HTTP

# http(METHOD, PATH, BODY, %opts) -> (status, headers, json-or-raw, raw)
# BODY: a hash/array ref (sent as JSON), a string (sent as is) or undef.
# Status 599 means HTTP::Tiny failed (connection refused, timeout...).
sub http {
    my ($method, $path, $body, %o) = @_;
    my $s = $o{server} // $CURRENT or die "no server";
    my %h = %{ $o{headers} // {} };
    my %req = (headers => \%h);
    if (defined $body) {
        $h{'Content-Type'} //= 'application/json';
        $req{content} = ref $body ? $JSON->encode($body) : $body;
    }
    my $r = $HT->request($method, $s->url . $path, \%req);
    my $raw = $r->{content} // '';
    my $j = json_decode($raw);
    return ($r->{status}, $r->{headers}, defined $j ? $j : $raw, $raw);
}

# The served model id (GET /v1/models data[0].id), cached per server.
sub model_id {
    return $MODEL_ID if defined $MODEL_ID;
    my ($st, undef, $j) = http(GET => '/v1/models');
    die "GET /v1/models: $st" unless $st == 200 && ref $j eq 'HASH'
        && ref $j->{data} eq 'ARRAY' && @{ $j->{data} };
    return $MODEL_ID = $j->{data}[0]{id};
}

# POST /tokenize: a string prompt or a hash of fields; returns the json.
sub tokenize {
    my ($what, %more) = @_;
    my $b = ref $what ? { %$what, %more } : { prompt => $what, %more };
    my ($st, undef, $j) = http(POST => '/tokenize', $b);
    die "POST /tokenize: $st " . (ref $j ? json_encode($j) : $j)
        unless $st == 200 && ref $j eq 'HASH';
    return $j;
}


# -------------------------------------------------------------------- SSE

# Open a request on a raw socket (Connection: close) and return a
# LocalMoE::Test::Stream; nothing is read yet.
sub sse_open {
    my ($path, $body, %o) = @_;
    my $s = $o{server} // $CURRENT or die "no server";
    return LocalMoE::Test::Stream->new(port => $s->{port}, path => $path,
        body => $body, %o);
}

# Whole streamed response: the Stream object (events, text, raw, timing).
sub sse {
    my ($path, $body, %o) = @_;
    my $st = sse_open($path, $body, %o);
    $st->read_all($o{timeout} // 120);
    return $st;
}

# Run many streams at once in this process (IO::Select); returns them in
# order once every one has ended (or the timeout passed).
sub sse_many {
    my ($reqs, %o) = @_;
    my @st = map { sse_open($_->[0], $_->[1], %o) } @$reqs;
    my $sel = IO::Select->new(map { $_->{sock} } @st);
    my %by = map { fileno($_->{sock}) => $_ } @st;
    my $deadline = time + ($o{timeout} // 120);
    while ($sel->count && time < $deadline) {
        for my $fh ($sel->can_read(0.5)) {
            my $x = $by{ fileno $fh };
            my $n = $x->pump;
            if (defined $n && $n == 0 || $x->{ended}) {
                $sel->remove($fh);
            }
        }
    }
    $_->close for @st;
    return @st;
}


package LocalMoE::Test::Stream;

# One HTTP/1.1 request on a raw socket, parsed incrementally: status line,
# headers, chunked transfer decoding (strict), then SSE events split on a
# blank line.  Each `data: X` event is recorded with the time it completed;
# anything not exactly `data: <payload>\n\n` (or a `:` comment) is recorded
# as a framing error.

use strict;
use warnings;
use Time::HiRes qw(time);
use IO::Select;
use Errno qw(EAGAIN EWOULDBLOCK EINTR);

sub new {
    my ($class, %a) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $a{port}, Proto => 'tcp', Timeout => 5)
        or die "connect 127.0.0.1:$a{port}: $!";
    my $body = $a{body};
    $body = $JSON->encode($body) if ref $body;
    my $method = $a{method} // (defined $body ? 'POST' : 'GET');
    my $req = "$method $a{path} HTTP/1.1\r\nHost: 127.0.0.1:$a{port}\r\n"
        . "Connection: close\r\n";
    $req .= "$_: $a{headers}{$_}\r\n" for sort keys %{ $a{headers} // {} };
    if (defined $body) {
        $req .= "Content-Type: application/json\r\n"
            unless grep { lc eq 'content-type' } keys %{ $a{headers} // {} };
        $req .= "Content-Length: " . length($body) . "\r\n";
    }
    $req .= "\r\n" . ($body // '');
    my $self = bless {
        sock => $sock, t0 => time, raw => '', hbuf => '', cbuf => '',
        sbuf => '', body => '', hdr_done => 0, headers => {},
        events => [], comments => [], errors => [], chunks => [],
        eof => 0, ended => 0,
    }, $class;
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite $sock, $req, length($req) - $off, $off;
        if (!defined $n) {
            next if $! == EINTR;
            push @{ $self->{errors} }, "write: $!";
            last;
        }
        $off += $n;
    }
    $sock->blocking(0);
    return $self;
}

# One non-blocking read: bytes read, 0 on EOF/error, undef if nothing yet.
sub pump {
    my ($self) = @_;
    return 0 if $self->{eof};
    my $n = sysread $self->{sock}, my $buf, 65536;
    if (!defined $n) {
        return undef if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        push @{ $self->{errors} }, "read: $!";
        $self->{eof} = 1;
        return 0;
    }
    if ($n == 0) {
        $self->{eof} = 1;
        push @{ $self->{errors} }, 'connection closed before the last chunk'
            if $self->{chunked} && !$self->{ended};
        $self->{ended} = 1;
        return 0;
    }
    $self->{raw} .= $buf;
    $self->_feed($buf, time);
    return $n;
}

sub _feed {
    my ($self, $buf, $t) = @_;
    if (!$self->{hdr_done}) {
        $self->{hbuf} .= $buf;
        my $i = index $self->{hbuf}, "\r\n\r\n";
        return if $i < 0;
        my $head = substr $self->{hbuf}, 0, $i;
        $buf = substr $self->{hbuf}, $i + 4;
        $self->{hbuf} = '';
        $self->{hdr_done} = 1;
        $self->{header_time} = $t - $self->{t0};
        my ($sl, @h) = split /\r\n/, $head;
        ($self->{status}) = $sl =~ m{^HTTP/1\.[01] (\d{3})};
        $self->{status_line} = $sl;
        for (@h) {
            my ($k, $v) = /^([^:]+):\s*(.*)$/ or next;
            $k = lc $k;
            $self->{headers}{$k} = exists $self->{headers}{$k}
                ? "$self->{headers}{$k}, $v" : $v;
        }
        $self->{chunked} = ($self->{headers}{'transfer-encoding'} // '')
            =~ /chunked/i ? 1 : 0;
    }
    if (!$self->{chunked}) {
        $self->_body($buf, $t) if length $buf;
        return;
    }
    $self->{cbuf} .= $buf;
    while (length $self->{cbuf} && !$self->{ended}) {
        my $nl = index $self->{cbuf}, "\r\n";
        return if $nl < 0;
        my $line = substr $self->{cbuf}, 0, $nl;
        if ($line !~ /^([0-9a-fA-F]+)(;.*)?$/) {
            push @{ $self->{errors} }, "bad chunk size line: "
                . substr($line, 0, 60);
            $self->{ended} = 1;
            return;
        }
        my $size = hex $1;
        if ($size == 0) {
            # no trailers expected: "0\r\n\r\n"
            return if length $self->{cbuf} < $nl + 4;
            push @{ $self->{errors} }, 'bad last chunk'
                unless substr($self->{cbuf}, $nl + 2, 2) eq "\r\n";
            $self->{ended} = 1;
            $self->{end_time} = $t - $self->{t0};
            push @{ $self->{errors} }, 'bytes after the last chunk'
                if length($self->{cbuf}) > $nl + 4;
            return;
        }
        return if length $self->{cbuf} < $nl + 2 + $size + 2;
        my $data = substr $self->{cbuf}, $nl + 2, $size;
        push @{ $self->{errors} }, 'chunk not followed by CRLF'
            unless substr($self->{cbuf}, $nl + 2 + $size, 2) eq "\r\n";
        substr($self->{cbuf}, 0, $nl + 2 + $size + 2) = '';
        push @{ $self->{chunks} }, $size;
        $self->_body($data, $t);
    }
}

sub _body {
    my ($self, $data, $t) = @_;
    $self->{body} .= $data;
    return unless ($self->{headers}{'content-type'} // '')
        =~ m{text/event-stream};
    $self->{sbuf} .= $data;
    while ((my $i = index $self->{sbuf}, "\n\n") >= 0) {
        my $ev = substr $self->{sbuf}, 0, $i;
        substr($self->{sbuf}, 0, $i + 2) = '';
        $self->_event($ev, $t);
    }
}

sub _event {
    my ($self, $ev, $t) = @_;
    if ($ev =~ /\A:/) {
        push @{ $self->{comments} }, $ev;
        push @{ $self->{errors} }, "bad comment event: $ev"
            if grep { !/^:/ } split /\n/, $ev;
        return;
    }
    if ($ev !~ /\Adata: ([^\n]*)\z/) {
        push @{ $self->{errors} }, "bad event framing: " . substr($ev, 0, 120);
        return;
    }
    my $d = $1;
    push @{ $self->{errors} }, "event after [DONE]: " . substr($d, 0, 80)
        if @{ $self->{events} } && $self->{events}[-1]{data} eq '[DONE]';
    my $j;
    if ($d ne '[DONE]') {
        $j = LocalMoE::Test::json_decode($d);
        push @{ $self->{errors} }, "event is not JSON: " . substr($d, 0, 120)
            unless ref $j eq 'HASH';
    }
    push @{ $self->{events} }, { data => $d, json => $j, t => $t - $self->{t0} };
}

# Read until at least $k data events arrived (or the end / timeout).
sub read_events {
    my ($self, $k, $timeout) = @_;
    my $deadline = time + ($timeout // 60);
    my $sel = IO::Select->new($self->{sock});
    while (!$self->{ended} && !$self->{eof} && @{ $self->{events} } < $k) {
        my $left = $deadline - time;
        last if $left <= 0;
        $self->pump if $sel->can_read($left > 0.5 ? 0.5 : $left);
    }
    return scalar @{ $self->{events} };
}

# Read the whole response (until the last chunk, EOF or timeout).
sub read_all {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // 120);
    my $sel = IO::Select->new($self->{sock});
    while (!$self->{ended} && !$self->{eof}) {
        my $left = $deadline - time;
        if ($left <= 0) {
            push @{ $self->{errors} }, "timeout reading the response";
            last;
        }
        $self->pump if $sel->can_read($left > 0.5 ? 0.5 : $left);
    }
    $self->close;
    return $self;
}

sub close {
    my ($self) = @_;
    if ($self->{sock}) {
        CORE::close($self->{sock});
        $self->{sock} = undef;
    }
    return $self;
}

sub status  { $_[0]{status} }
sub headers { $_[0]{headers} }
sub header  { $_[0]{headers}{ lc $_[1] } }
sub raw     { $_[0]{raw} }
sub body    { $_[0]{body} }
sub errors  { @{ $_[0]{errors} } }
sub events  { @{ $_[0]{events} } }
# decoded JSON chunks (everything but [DONE])
sub chunks  { map { $_->{json} } grep { $_->{data} ne '[DONE]' } @{ $_[0]{events} } }
sub done    { my @e = @{ $_[0]{events} }; @e && $e[-1]{data} eq '[DONE]' }
sub json    { LocalMoE::Test::json_decode($_[0]{body}) }

# Concatenated generated text: chat delta.content or completion text.
sub text {
    my ($self) = @_;
    my $t = '';
    for my $c ($self->chunks) {
        next unless ref $c eq 'HASH' && ref $c->{choices} eq 'ARRAY';
        for my $ch (@{ $c->{choices} }) {
            if (ref $ch->{delta} eq 'HASH') {
                $t .= $ch->{delta}{content} // '';
            } else {
                $t .= $ch->{text} // '';
            }
        }
    }
    return $t;
}

# finish_reason of the last chunk that has one
sub finish_reason {
    my ($self) = @_;
    my $fr;
    for my $c ($self->chunks) {
        next unless ref $c eq 'HASH' && ref $c->{choices} eq 'ARRAY';
        for my $ch (@{ $c->{choices} }) {
            $fr = $ch->{finish_reason} if defined $ch->{finish_reason};
        }
    }
    return $fr;
}

# A one-line summary for diagnostics.
sub summary {
    my ($self) = @_;
    my $b = $self->{body};
    $b = substr($b, 0, 400) . '...' if length $b > 400;
    return "status " . ($self->{status} // 'none') . "; "
        . scalar(@{ $self->{events} }) . " events; errors: ["
        . join('; ', @{ $self->{errors} }) . "]; body: $b";
}

1;
