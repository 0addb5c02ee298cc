#!/usr/bin/perl
# Guided decoding over HTTP on the embedded test model: guided_json (object
# and string), guided_regex, guided_grammar, guided_choice and
# response_format (json_object, json_schema, text) on chat and completions,
# streamed and not, prompt as text and as token ids; the output always
# satisfies the guide (parses as JSON and validates against the schema,
# matches the regex, is one of the choices), at temperature 0 and sampled.
# Wrong types and guides that do not compile are 400s naming the field.
# Then the OpenAI Node SDK (t/node/guided.test.mjs): response_format
# json_schema through chat.completions.create and the SDK's parse helper.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

binmode(Test::More->builder->$_, ':encoding(UTF-8)')
    for qw(output failure_output todo_output);

my $s = start_server();
my $M = model_id();
my $T = JSON::PP::true;
my $F = JSON::PP::false;

my $schema = {
    type => 'object',
    properties => {
        name  => { type => 'string', maxLength => 12 },
        age   => { type => 'integer', minimum => 0 },
        color => { enum => ['red', 'green', 'blue'] },
        tags  => { type => 'array', items => { type => 'string',
                   maxLength => 6 }, maxItems => 3 },
    },
    required => ['name', 'age', 'color'],
    additionalProperties => $F,
};

# the schema's checks, by hand
sub valid_person {
    my ($text) = @_;
    my $j = eval { JSON::PP->new->decode($text) };
    return "not JSON: $@" unless ref $j eq 'HASH';
    for my $k (keys %$j) {
        return "extra key $k" unless $k =~ /^(name|age|color|tags)$/;
    }
    return 'name' unless defined $j->{name} && !ref $j->{name}
        && length($j->{name}) <= 12;
    return 'age' unless defined $j->{age} && $j->{age} =~ /^\d+$/;
    return 'color' unless defined $j->{color}
        && $j->{color} =~ /^(red|green|blue)$/;
    if (exists $j->{tags}) {
        return 'tags' unless ref $j->{tags} eq 'ARRAY' && @{ $j->{tags} } <= 3;
    }
    return '';
}

my $chat = { model => $M, max_tokens => 150,
             messages => [{ role => 'user', content => 'Describe a person.' }] };
my $cmpl = { model => $M, max_tokens => 150, prompt => 'A person:' };

# response_format json_schema, chat, greedy and sampled
for my $temp (0, 1) {
    my ($st, undef, $j) = http(POST => '/v1/chat/completions', { %$chat,
        temperature => $temp, seed => 7,
        response_format => { type => 'json_schema', json_schema => {
            name => 'person', schema => $schema, strict => $T } } });
    is($st, 200, "chat json_schema temperature $temp: 200") or diag explain $j;
    my $c = $j->{choices}[0]{message}{content} // '';
    is(valid_person($c), '', "chat json_schema temperature $temp: the "
       . "content validates: $c");
    is($j->{choices}[0]{finish_reason}, 'stop', 'finish_reason stop');
}

# guided_json on completions: an object and the same schema as a string
for my $form ('object', 'string') {
    my $g = $form eq 'object' ? $schema : JSON::PP->new->encode($schema);
    my ($st, undef, $j) = http(POST => '/v1/completions', { %$cmpl,
        temperature => 0.8, seed => 3, guided_json => $g });
    is($st, 200, "completions guided_json ($form): 200") or diag explain $j;
    my $t = $j->{choices}[0]{text} // '';
    is(valid_person($t), '', "completions guided_json ($form) validates: $t");
}

# streamed chat with json_schema
{
    my $sse = sse('/v1/chat/completions', { %$chat, stream => $T,
        temperature => 0, response_format => { type => 'json_schema',
        json_schema => { name => 'p', schema => $schema } } });
    ok($sse->done, 'streamed json_schema ends with [DONE]');
    is(valid_person($sse->text), '', 'streamed json_schema: the deltas '
       . 'join into a valid document: ' . $sse->text);
}

# response_format json_object
{
    my ($st, undef, $j) = http(POST => '/v1/chat/completions', { %$chat,
        temperature => 0, max_tokens => 200,
        response_format => { type => 'json_object' } });
    is($st, 200, 'json_object: 200') or diag explain $j;
    my $c = $j->{choices}[0]{message}{content} // '';
    my $fr = $j->{choices}[0]{finish_reason} // '';
    if ($fr eq 'stop') {
        my $o = eval { JSON::PP->new->decode($c) };
        is(ref $o, 'HASH', "json_object: content is a JSON object: $c");
    } else {
        like($c, qr/^\{/, "json_object: cut at length, an object's start: $c");
    }
}

# response_format text: plain generation
{
    my ($st, undef, $j) = http(POST => '/v1/chat/completions', { %$chat,
        max_tokens => 5, response_format => { type => 'text' } });
    is($st, 200, 'response_format text: 200') or diag explain $j;
}

# regex, choice, grammar; prompt as token ids too
{
    my ($st, undef, $j) = http(POST => '/v1/completions', { %$cmpl,
        temperature => 1, seed => 11, guided_regex => '[a-z]{3,5}-\d{2}' });
    is($st, 200, 'guided_regex: 200') or diag explain $j;
    like($j->{choices}[0]{text} // '', qr/^[a-z]{3,5}-\d{2}$/,
         'guided_regex: the text matches');

    my $ids = tokenize('A person:', add_special_tokens => $T)->{tokens};
    for my $p ('A person:', $ids) {
        ($st, undef, $j) = http(POST => '/v1/completions', { %$cmpl,
            prompt => $p, temperature => 1, seed => 5,
            guided_choice => ['yes', 'no', 'maybe later'] });
        is($st, 200, 'guided_choice: 200 (prompt ' . (ref $p ? 'ids' : 'text')
           . ')') or diag explain $j;
        like($j->{choices}[0]{text} // '', qr/^(yes|no|maybe later)$/,
             'guided_choice: one of the choices');
    }

    my $gbnf = qq{root ::= "(" num ( "+" num )* ")"\nnum ::= [1-9] [0-9]?\n};
    ($st, undef, $j) = http(POST => '/v1/chat/completions', { %$chat,
        temperature => 0.7, seed => 2, guided_grammar => $gbnf });
    is($st, 200, 'guided_grammar: 200') or diag explain $j;
    like($j->{choices}[0]{message}{content} // '',
         qr/^\([1-9][0-9]?(\+[1-9][0-9]?)*\)$/, 'guided_grammar: matches');
}

# errors: 400 naming the field
my @bad = (
    [ { guided_json => 5 }, 'guided_json', qr/JSON Schema/ ],
    [ { guided_json => '{"type":' }, 'guided_json', qr/not valid JSON/ ],
    [ { guided_json => { type => 'string', not => {} } }, 'guided_json',
      qr/unsupported keyword 'not'/ ],
    [ { guided_regex => 5 }, 'guided_regex', qr/non-empty string/ ],
    [ { guided_regex => 'ab(' }, 'guided_regex', qr/regex: missing '\)' at offset 2/ ],
    [ { guided_grammar => 'root ::= foo' }, 'guided_grammar',
      qr/undefined rule 'foo'/ ],
    [ { guided_grammar => 'root ::= "a' }, 'guided_grammar', qr/offset 9/ ],
    [ { guided_choice => 'yes' }, 'guided_choice', qr/array of strings/ ],
    [ { guided_choice => [] }, 'guided_choice', qr/array of strings/ ],
    [ { guided_choice => ['a', 1] }, 'guided_choice', qr/array of strings/ ],
    [ { response_format => 5 }, 'response_format', qr/object/ ],
    [ { response_format => { type => 'xml' } }, 'response_format',
      qr/json_schema/ ],
    [ { response_format => { type => 'json_schema' } }, 'response_format',
      qr/json_schema/ ],
    [ { response_format => { type => 'json_schema', json_schema => {
        name => 'x', schema => 'str' } } }, 'response_format', qr/schema/ ],
    [ { response_format => { type => 'json_schema', json_schema => {
        name => 'x', schema => { type => 'array', minItems => 3,
        maxItems => 1 } } } }, 'response_format', qr/empty language/ ],
    [ { guided_regex => 'a', guided_choice => ['a'] }, undef,
      qr/only one of/ ],
);
my $deep = { type => 'string' };
$deep = { type => 'array', items => $deep } for 1 .. 100;
# as text: the body itself stays shallow, the schema nests 100 deep
push @bad, [ { guided_json => JSON::PP->new->encode($deep) }, 'guided_json',
             qr/too (deep|large)/ ];
for my $b (@bad) {
    my ($extra, $param, $re) = @$b;
    for my $route ('/v1/chat/completions', '/v1/completions') {
        my $req = $route =~ /chat/ ? { %$chat, %$extra } : { %$cmpl, %$extra };
        my ($st, undef, $j) = http(POST => $route, $req);
        my $what = "$route " . substr(JSON::PP->new->canonical
                                      ->encode($extra), 0, 100);
        is($st, 400, "$what: 400");
        my $e = ref $j eq 'HASH' ? $j->{error} // {} : {};
        is($e->{param}, $param, "$what: param " . ($param // 'any'))
            if defined $param;
        like($e->{message} // '', $re, "$what: message names it");
    }
}

# the server still serves after all that
{
    my ($st) = http(POST => '/v1/completions', { %$cmpl, max_tokens => 2 });
    is($st, 200, 'plain completion after the errors: 200');
}

# ------------------------------------------------------ OpenAI Node SDK
node_sdk_run($s, 'guided.test.mjs');

finish();
