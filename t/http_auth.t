#!/usr/bin/perl
# API keys (issue 9 item 1): the engine YAML's server: section names user
# keys (api_key, api_key_file) and admin keys (admin_api_key); requests
# carry "Authorization: Bearer KEY".  Checks: no key and a wrong key get
# 401 with an OpenAI error body and WWW-Authenticate: Bearer; the right key
# (inline or from the file) gets 200; the admin routes (/v1/models/switch,
# /v1/stats/*) answer 403 to a user key and go on for the admin key;
# /health is open; /metrics follows moe_metrics (key by default, open,
# admin; nginx deny also works); nginx -s reload re-reads the key file; a
# bad key in the YAML fails nginx -t without quoting it; no key is ever in
# error.log.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use HTTP::Tiny;
use LocalMoE::Test;

my @user  = ('sk-user-one-0123456789', 'sk-user-two-abcdef');
my @file  = ('sk-file-A-42424242', 'sk-file-B-77777777');
my $admin = 'sk-admin-secret-31337';
my $fresh = 'sk-file-C-after-reload';

my ($p2, $p3, $p4) = (free_port(), free_port(), free_port());
my $s = LocalMoE::Test::prepare_server(
    server => { api_key => [@user], api_key_file => 'keys.txt',
                admin_api_key => $admin },
    http_conf => join('',
        "server { listen 127.0.0.1:$p2; location / { moe_api; "
            . "moe_metrics open; } }\n",
        "server { listen 127.0.0.1:$p3; location / { moe_api; "
            . "moe_metrics admin; } }\n",
        "server { listen 127.0.0.1:$p4; location / { moe_api; "
            . "moe_metrics open; deny all; } }\n"));
LocalMoE::Test::spew($s->dir . '/keys.txt',
    "# user keys, one a line\n$file[0]\n\n  $file[1]  \r\n#sk-commented\n");
$s->start;
$LocalMoE::Test::CURRENT = $s;

sub bearer { +{ Authorization => "Bearer $_[0]" } }

sub get {
    my ($path, $key, %o) = @_;
    return http(GET => $path, undef,
                headers => defined $key ? bearer($key) : {}, %o);
}

sub refused {
    my ($what, @r) = @_;
    my $status = pop @r;
    my ($st, $h, $j) = @r;
    is($st, $status, "$what: $status");
    my $e = ref $j eq 'HASH' ? $j->{error} : undef;
    ok(ref $e eq 'HASH' && length($e->{message} // '')
       && exists $e->{param}, "$what: OpenAI error body")
        or diag explain $j;
    if ($status == 401) {
        is($e->{code}, 'invalid_api_key', "$what: code invalid_api_key");
        is($e->{type}, 'invalid_request_error', "$what: type");
        like($h->{'www-authenticate'} // '', qr/^Bearer/,
             "$what: WWW-Authenticate: Bearer");
    } else {
        is($e->{type}, 'permission_error', "$what: type permission_error");
    }
}

# /health is open, everything else needs a key
{
    my ($st) = get('/health');
    is($st, 200, '/health without a key: 200');
    refused('/v1/models without a key', get('/v1/models'), 401);
    refused('/v1/models with a wrong key', get('/v1/models', 'sk-nope'),
            401);
    refused('a prefix of a key', get('/v1/models', substr($user[0], 0, -1)),
            401);
    refused('a key plus a byte', get('/v1/models', "$user[0]x"), 401);
    refused('an empty key', get('/v1/models', ''), 401);
    refused('Basic instead of Bearer',
            http(GET => '/v1/models', undef,
                 headers => { Authorization => "Basic $user[0]" }), 401);
    refused('an unknown route without a key', get('/v1/nothing'), 401);
    refused('POST without a key',
            http(POST => '/v1/completions',
                 { prompt => 'In the beginning', max_tokens => 2 }), 401);
}

for my $k (@user, @file, $admin) {
    my ($st) = get('/v1/models', $k);
    is($st, 200, "/v1/models with key " . substr($k, 0, 7) . "...: 200");
}

{
    my ($st) = http(GET => '/v1/models', undef,
                    headers => { Authorization => "bearer  $file[1]" });
    is($st, 200, 'the scheme is case-insensitive, spaces around the key');
    my ($cs, undef, $cj) = http(POST => '/v1/completions',
        { prompt => 'In the beginning', max_tokens => 3,
          temperature => 0 }, headers => bearer($user[1]));
    is($cs, 200, 'a completion with a user key: 200');
    is($cj->{usage}{completion_tokens}, 3, 'it generated 3 tokens')
        or diag explain $cj;
}

# the admin routes
for my $path ('/v1/stats/memory', '/v1/stats/performance') {
    refused("$path without a key", get($path), 401);
    refused("$path with a user key", get($path, $user[0]), 403);
    my ($st) = get($path, $admin);
    is($st, 200, "$path with the admin key: 200");
}
{
    my $body = { model_name => 'x', tensor_parallel_size => 1 };
    refused('switch with a user key',
            http(POST => '/v1/models/switch', $body,
                 headers => bearer($file[0])), 403);
    my ($st) = http(POST => '/v1/models/switch', $body,
                    headers => bearer($admin));
    isnt($st, 401, 'switch with the admin key gets past the keys');
    isnt($st, 403, 'switch with the admin key is not forbidden');
}

# /metrics: key (the default here), open, admin, nginx deny
{
    refused('/metrics (moe_metrics key) without a key', get('/metrics'),
            401);
    my ($st, undef, undef, $raw) = get('/metrics', $user[0]);
    is($st, 200, '/metrics (key) with a user key: 200');
    like($raw, qr/^localmoe_/m, '/metrics: Prometheus text');

    my $ht = HTTP::Tiny->new(timeout => 30);
    my $r = $ht->get("http://127.0.0.1:$p2/metrics");
    is($r->{status}, 200, '/metrics (moe_metrics open) without a key: 200');
    $r = $ht->get("http://127.0.0.1:$p2/v1/models");
    is($r->{status}, 401, '... while /v1/models there still needs a key');

    $r = $ht->get("http://127.0.0.1:$p3/metrics",
                  { headers => bearer($user[0]) });
    is($r->{status}, 403, '/metrics (moe_metrics admin) with a user key: 403');
    $r = $ht->get("http://127.0.0.1:$p3/metrics",
                  { headers => bearer($admin) });
    is($r->{status}, 200, '/metrics (admin) with the admin key: 200');

    $r = $ht->get("http://127.0.0.1:$p4/metrics");
    is($r->{status}, 403, '/metrics behind nginx "deny all": 403');
}

# nginx -s reload reads the key file again
LocalMoE::Test::spew($s->dir . '/keys.txt', "$fresh\n");
ok($s->reload, 'nginx -s reload: a new worker serves');
{
    my $ok = 0;
    for (1 .. 50) {            # the old worker may take a last request
        my ($st) = get('/v1/models', $fresh);
        if ($st == 200) { $ok = 1; last }
        select undef, undef, undef, 0.1;
    }
    ok($ok, 'after reload: the key added to the file is accepted');
    refused('after reload: a key removed from the file',
            get('/v1/models', $file[0]), 401);
    my ($st) = get('/v1/models', $user[0]);
    is($st, 200, 'after reload: the YAML keys still work');
}

# a bad key in the YAML fails nginx -t, naming the line but not the key
{
    my $bad = LocalMoE::Test::prepare_server(
        server => { api_key => ['sk-hidden-value-555', ''] });
    my ($rc, $out) = nginx_test($bad);
    isnt($rc, 0, 'nginx -t: an empty api_key fails');
    like($out, qr/api_key: a key must be/, 'nginx -t: says why');
    unlike($out, qr/sk-hidden-value-555/, 'nginx -t: the keys are not quoted');

    my $badm = LocalMoE::Test::prepare_server(
        location_conf => 'moe_metrics everyone;');
    ($rc, $out) = nginx_test($badm);
    isnt($rc, 0, 'nginx -t: moe_metrics takes only open, key or admin');
    like($out, qr/invalid value "everyone"/, 'nginx -t: names the value');

    my $nofile = LocalMoE::Test::prepare_server(
        server => { api_key_file => 'missing-keys.txt' });
    ($rc, $out) = nginx_test($nofile);
    isnt($rc, 0, 'nginx -t: a missing api_key_file fails');
    like($out, qr/api_key_file .*missing-keys\.txt.* cannot be read/,
         'nginx -t: names the file');
}

stop_server($s);
my $log = $s->error_log;
for my $k (@user, @file, $admin, $fresh) {
    unlike($log, qr/\Q$k\E/, 'error.log never holds key '
           . substr($k, 0, 7) . '...');
}
finish();
