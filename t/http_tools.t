#!/usr/bin/perl
# Tool calling over HTTP (/v1/chat/completions):
#   * wrong shapes of tools, tool_choice, functions, function_call and of
#     tool calls in messages: 400 naming the field; the fields on
#     /v1/completions: 400;
#   * tools reach the chat template: with a Hermes-shaped template
#     (t/data/chat/tools/hermes.jinja) the prompt of a request with tools,
#     an assistant tool call (arguments given as a JSON string) and a tool
#     result is exactly the text the template must make (/tokenize tokens
#     equal, usage.prompt_tokens equal); tool_choice "none" still shows the
#     tools to the template (vLLM's default); legacy functions render as
#     tools;
#   * tool_choice "auto" answers in the chat shape (content, or tool_calls
#     with finish_reason tool_calls), streamed and not; with the output
#     forced by guided_choice, the hermes parser splits content and call
#     (streamed: no piece of the call leaks as content; the argument
#     fragments make the arguments), malformed JSON stays content, and
#     vllm.tool_call_parser: llama3_json reads its own form instead;
#   * tool_choice "required" and a named function on the embedded model:
#     the guided decoder makes the output a call whatever the model's
#     skill: tool_calls with id call_..., the function's name, arguments
#     that parse and validate against its schema, finish_reason
#     tool_calls, content null; the stream's deltas (first: index, id,
#     type, name, arguments ""; then argument fragments) reassemble to the
#     same call at temperature 0; legacy function_call answers with
#     message.function_call and finish_reason function_call.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $root = root_dir();
my $s = start_server(vllm => { max_model_len => 1024,
    chat_template => "$root/t/data/chat/tools/hermes.jinja" });
my $M = model_id();
my $C = '/v1/chat/completions';
my $T = JSON::PP::true;

my $weather = { type => 'function', function => {
    name => 'get_weather', description => 'Weather in a city',
    parameters => { type => 'object',
        properties => { city => { type => 'string',
                                  enum => ['Paris', 'Rome'] },
                        days => { type => 'integer', enum => [1, 2, 3] } },
        required => ['city', 'days'], additionalProperties => JSON::PP::false },
} };
my $time = { type => 'function', function => {
    name => 'get_time',
    parameters => { type => 'object',
        properties => { zone => { type => 'string', enum => ['utc', 'cet'] } },
        required => ['zone'], additionalProperties => JSON::PP::false },
} };
my @user = ({ role => 'user', content => 'Weather in Paris?' });
my %chat = (model => $M, messages => \@user, max_tokens => 40,
            temperature => 0);

# --- wrong shapes: 400 naming the field --------------------------------

my @refused = (
    ['tools a string', { tools => 'x' }, 'tools'],
    ['tools holds a number', { tools => [5] }, 'tools'],
    ['tools type not function', { tools => [{ type => 'retrieval' }] },
        'tools'],
    ['function without a name', { tools => [{ type => 'function',
        function => { parameters => { type => 'object' } } }] }, 'tools'],
    ['function name with a space', { tools => [{ type => 'function',
        function => { name => 'get weather' } }] }, 'tools'],
    ['parameters not an object', { tools => [{ type => 'function',
        function => { name => 'f', parameters => 'x' } }] }, 'tools'],
    ['tool_choice naming an unknown function', { tools => [$weather],
        tool_choice => { type => 'function',
                         function => { name => 'nope' } } }, 'tool_choice'],
    ['tool_choice object without a name', { tools => [$weather],
        tool_choice => { type => 'function', function => {} } },
        'tool_choice'],
    ['tool_choice bad string', { tools => [$weather],
        tool_choice => 'always' }, 'tool_choice'],
    ['tool_choice a number', { tools => [$weather], tool_choice => 5 },
        'tool_choice'],
    ['tool_choice required without tools', { tool_choice => 'required' },
        'tool_choice'],
    ['tools and functions both', { tools => [$weather],
        functions => [$weather->{function}] }, 'functions'],
    ['functions a string', { functions => 'x' }, 'functions'],
    ['function_call naming an unknown function',
        { functions => [$weather->{function}],
          function_call => { name => 'nope' } }, 'function_call'],
    ['function_call required (not in the legacy API)',
        { functions => [$weather->{function}],
          function_call => 'required' }, 'function_call'],
    ['tool_choice required with response_format', { tools => [$weather],
        tool_choice => 'required',
        response_format => { type => 'json_object' } }, 'tool_choice'],
    ['tool_calls not an array', { messages => [@user,
        { role => 'assistant', content => undef, tool_calls => 'x' }] },
        'messages'],
    ['tool call without a function name', { messages => [@user,
        { role => 'assistant', content => undef, tool_calls => [
            { id => 'call_1', type => 'function',
              function => { arguments => '{}' } }] }] }, 'messages'],
    ['tool_call_id a number', { messages => [@user,
        { role => 'tool', tool_call_id => 5, content => 'x' }] },
        'messages'],
);

for my $c (@refused) {
    my ($what, $over, $param) = @$c;
    my ($st, undef, $j, $raw) = http(POST => $C, { %chat, %$over });
    is($st, 400, "$what: 400") or diag substr($raw, 0, 300);
    is(ref $j eq 'HASH' ? $j->{error}{param} : undef, $param,
       "$what: param $param");
}

for my $f (qw(tools tool_choice functions)) {
    my $v = $f eq 'tool_choice' ? 'auto'
          : $f eq 'tools' ? [$weather] : [$weather->{function}];
    my ($st, undef, $j) = http(POST => '/v1/completions',
        { model => $M, prompt => 'hi', max_tokens => 1, $f => $v });
    is($st, 400, "$f on /v1/completions: 400");
    is(ref $j eq 'HASH' ? $j->{error}{param} : undef, $f,
       "$f on /v1/completions: param $f");
}

# --- the prompt the template makes --------------------------------------

my $tools_text = join '', map { json_py($_) . "\n" } ($weather);
chop $tools_text;
my $conv = [@user,
    { role => 'assistant', content => undef, tool_calls => [
        { id => 'call_abc', type => 'function', function => {
            name => 'get_weather',
            arguments => '{"city": "Paris", "days": 2}' } }] },
    { role => 'tool', tool_call_id => 'call_abc', content => '22C' }];
my $want = "<|im_start|>system\n# Tools\n<tools>$tools_text</tools>\n"
    . "Call a function as <tool_call>{\"name\": ..., \"arguments\": ...}"
    . "</tool_call><|im_end|>\n"
    . "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    . "<|im_start|>assistant<tool_call>\n{\"name\": \"get_weather\", "
    . "\"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>"
    . "<|im_end|>\n<|im_start|>user\n<tool_response>\n22C\n"
    . "</tool_response><|im_end|>\n<|im_start|>assistant\n";

my $exp = tokenize({ prompt => $want, add_special_tokens => JSON::PP::false });
my $got = tokenize({ messages => $conv, tools => [$weather] });
is_deeply($got->{tokens}, $exp->{tokens},
          'tools + a tool call + a tool result: the template\'s exact prompt')
    or diag "got " . scalar(@{ $got->{tokens} }) . " tokens, want "
          . scalar(@{ $exp->{tokens} });

my ($st, undef, $j, $raw) = http(POST => $C,
    { %chat, messages => $conv, tools => [$weather], max_tokens => 1 });
is($st, 200, 'chat with that conversation: 200') or diag $raw;
is($j->{usage}{prompt_tokens}, $exp->{count},
   'chat: usage.prompt_tokens is that prompt\'s');

($st, undef, $j) = http(POST => $C, { %chat, messages => $conv,
    tools => [$weather], tool_choice => 'none', max_tokens => 1 });
is($j->{usage}{prompt_tokens}, $exp->{count},
   'tool_choice none: the template still sees the tools (as vLLM)');
ok(!exists $j->{choices}[0]{message}{tool_calls},
   'tool_choice none: no tool_calls');

# functions become {"type": "function", "function": ...} in that order
(my $legacy = $want) =~ s/\Q$tools_text\E/'{"type": "function", "function": '
    . json_py($weather->{function}) . '}'/e;
$exp = tokenize({ prompt => $legacy, add_special_tokens => JSON::PP::false });
$got = tokenize({ messages => $conv, functions => [$weather->{function}] });
is_deeply($got->{tokens}, $exp->{tokens},
          'legacy functions reach the template as tools');

$exp = tokenize({ prompt => "<|im_start|>user\nWeather in Paris?"
    . "<|im_end|>\n<|im_start|>assistant\n",
    add_special_tokens => JSON::PP::false });
$got = tokenize({ messages => \@user });
is_deeply($got->{tokens}, $exp->{tokens}, 'no tools: tools is none');

# --- auto: the parser decides -------------------------------------------

($st, undef, $j, $raw) = http(POST => $C, { %chat, tools => [$weather] });
is($st, 200, 'auto: 200') or diag $raw;
my $ch = $j->{choices}[0] // {};
my $msg = $ch->{message} // {};
ok(($msg->{tool_calls} && $ch->{finish_reason} eq 'tool_calls')
   || (defined $msg->{content} && !exists $msg->{tool_calls}
       && $ch->{finish_reason} =~ /^(stop|length)$/),
   "auto: content, or tool_calls with finish_reason tool_calls "
   . "($ch->{finish_reason})");

my $sse = sse($C, { %chat, tools => [$weather], stream => $T });
is($sse->status, 200, 'auto, streamed: 200');
ok($sse->done && !$sse->errors, 'auto, streamed: well-formed, [DONE]');
is($sse->text, $msg->{content} // '',
   'auto, streamed: the same content as not streamed (temperature 0)');

# --- required and named: the guided decoder -----------------------------

my %forced = (
    required => { tools => [$weather, $time], tool_choice => 'required',
                  parallel_tool_calls => JSON::PP::false },
    named    => { tools => [$weather, $time], tool_choice =>
        { type => 'function', function => { name => 'get_weather' } } },
);

{
    for my $mode (qw(required named)) {
        my %b = (%chat, %{ $forced{$mode} }, max_tokens => 120);
        ($st, undef, $j, $raw) = http(POST => $C, \%b);
        is($st, 200, "$mode: 200") or diag $raw;
        $ch = $j->{choices}[0] // {};
        $msg = $ch->{message} // {};
        my $calls = $msg->{tool_calls} // [];
        is($ch->{finish_reason}, 'tool_calls',
           "$mode: finish_reason tool_calls");
        ok(@$calls >= 1, "$mode: at least one call (" . @$calls . ")");
        ok(!defined $msg->{content}, "$mode: content null");
        for my $c (@$calls) {
            like($c->{id} // '', qr/^call_[A-Za-z0-9]{24}$/,
                 "$mode: id call_...");
            is($c->{type}, 'function', "$mode: type function");
            my $fn = $c->{function} // {};
            my $args = json_decode($fn->{arguments} // '');
            ok(ref $args eq 'HASH', "$mode: arguments parse as an object "
               . "($fn->{arguments})");
            my ($def) = grep { $_->{function}{name} eq ($fn->{name} // '') }
                $weather, $time;
            ok($def, "$mode: calls a given function ($fn->{name})");
            is($fn->{name}, 'get_weather', "$mode: the named function")
                if $mode eq 'named';
            is(validate($args, $def->{function}{parameters}), '',
               "$mode: arguments validate against the schema")
                if $def && ref $args eq 'HASH';
        }

        # streamed: the deltas rebuild the same calls
        $sse = sse($C, { %b, stream => $T });
        ok($sse->done && !$sse->errors, "$mode, streamed: well-formed");
        my (@rebuilt, $finish, $shape_ok);
        $shape_ok = 1;
        for my $chunk ($sse->chunks) {
            my $c0 = $chunk->{choices}[0] // next;
            $finish = $c0->{finish_reason} if $c0->{finish_reason};
            for my $d (@{ $c0->{delta}{tool_calls} // [] }) {
                my $i = $d->{index};
                if (!$rebuilt[$i]) {
                    $shape_ok &&= defined $d->{id} && $d->{type} eq 'function'
                        && defined $d->{function}{name}
                        && $d->{function}{arguments} eq '';
                    $rebuilt[$i] = { id => $d->{id}, type => 'function',
                        function => { name => $d->{function}{name},
                                      arguments => '' } };
                    next;
                }
                $shape_ok &&= !defined $d->{function}{name};
                $rebuilt[$i]{function}{arguments} .= $d->{function}{arguments};
            }
        }
        ok($shape_ok, "$mode, streamed: first delta has id, type, name and "
           . "arguments \"\"; later ones only arguments");
        is($finish, 'tool_calls', "$mode, streamed: finish_reason tool_calls");
        is_deeply([map { $_->{function} } @rebuilt],
                  [map { $_->{function} } @$calls],
                  "$mode, streamed: the deltas reassemble to the same calls");
    }

    # legacy: functions + function_call {name}
    ($st, undef, $j, $raw) = http(POST => $C, { %chat, max_tokens => 120,
        functions => [$weather->{function}],
        function_call => { name => 'get_weather' } });
    is($st, 200, 'legacy function_call: 200') or diag $raw;
    $ch = $j->{choices}[0] // {};
    is($ch->{finish_reason}, 'function_call',
       'legacy: finish_reason function_call');
    is($ch->{message}{function_call}{name}, 'get_weather',
       'legacy: message.function_call.name');
    my $a = json_decode($ch->{message}{function_call}{arguments} // '');
    is(ref $a eq 'HASH' ? validate($a, $weather->{function}{parameters})
                        : 'no object', '',
       'legacy: arguments validate against the schema');
}

# --- auto, end to end: the output forced by guided_choice ---------------
# (tool_choice auto with a guide: the parser reads what the model wrote)

my $said = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
    . "{\"city\": \"Rome\", \"days\": 3}}\n</tool_call>";
my %forced_out = (%chat, tools => [$weather], max_tokens => 200,
                  guided_choice => [$said]);
($st, undef, $j, $raw) = http(POST => $C, \%forced_out);
is($st, 200, 'auto, hermes output: 200') or diag $raw;
$ch = $j->{choices}[0] // {};
is($ch->{finish_reason}, 'tool_calls', 'auto, hermes output: tool_calls');
is($ch->{message}{content}, 'Sure. ', 'auto, hermes output: the content '
   . 'before the call');
is_deeply([map { [$_->{function}{name}, json_decode($_->{function}{arguments})] }
           @{ $ch->{message}{tool_calls} // [] }],
          [['get_weather', { city => 'Rome', days => 3 }]],
          'auto, hermes output: the call, arguments as written');

$sse = sse($C, { %forced_out, stream => $T });
my ($text, $leak, @deltas, $fin) = ('', 0);
for my $chunk ($sse->chunks) {
    my $c0 = $chunk->{choices}[0] // next;
    $fin = $c0->{finish_reason} if $c0->{finish_reason};
    my $t = $c0->{delta}{content} // '';
    $text .= $t;
    $leak ||= $t =~ /[<{]/;
    push @deltas, @{ $c0->{delta}{tool_calls} // [] };
}
is($text, 'Sure. ', 'auto, streamed: content deltas hold no piece of the call');
ok(!$leak, 'auto, streamed: no "<" or "{" went out as content');
is($fin, 'tool_calls', 'auto, streamed: finish_reason tool_calls');
ok(@deltas >= 2 && $deltas[0]{id} && $deltas[0]{function}{name} eq
   'get_weather' && $deltas[0]{function}{arguments} eq '',
   'auto, streamed: first delta id + name + arguments ""');
is_deeply(json_decode(join '', map { $_->{function}{arguments} // '' }
                                   @deltas),
          { city => 'Rome', days => 3 },
          'auto, streamed: the fragments make the arguments');

# malformed JSON inside the tags: plain content, finish_reason stop
my $bad = '<tool_call>{"name": "get_weather", "arguments": {oops}</tool_call>';
($st, undef, $j) = http(POST => $C, { %forced_out, guided_choice => [$bad] });
is($j->{choices}[0]{message}{content}, $bad,
   'auto, malformed call: the text is content');
is($j->{choices}[0]{finish_reason}, 'stop', 'auto, malformed call: stop');
ok(!exists $j->{choices}[0]{message}{tool_calls},
   'auto, malformed call: no tool_calls');

# vllm.tool_call_parser from the YAML: llama3_json reads the JSON form and
# takes the Hermes tags for content
stop_server($s);
$s = start_server(vllm => { max_model_len => 1024,
    tool_call_parser => 'llama3_json' });
$M = model_id();
my $llama = '{"name": "get_time", "parameters": {"zone": "cet"}}';
($st, undef, $j, $raw) = http(POST => $C, { %forced_out, model => $M,
    guided_choice => [$llama], tools => [$weather, $time] });
is($st, 200, 'tool_call_parser llama3_json: 200') or diag $raw;
is_deeply([map { [$_->{function}{name}, json_decode($_->{function}{arguments})] }
           @{ $j->{choices}[0]{message}{tool_calls} // [] }],
          [['get_time', { zone => 'cet' }]],
          'tool_call_parser llama3_json: {"name", "parameters"} is a call');
($st, undef, $j) = http(POST => $C, { %forced_out, model => $M });
is($j->{choices}[0]{message}{content}, $said,
   'tool_call_parser llama3_json: <tool_call> text is content');

# An assistant tool call's arguments string nested 400000 levels deep (800
# KB, under the 1 MB body limit): the body's own depth check does not see
# inside a string, and the module parsed it with yajl, whose tree free
# recursed once per level (the worker died).  Kept as the string it is
# (the template then sees text), nothing crashes, the next request works.
my $deep = ('[' x 400000) . (']' x 400000);
($st, undef, $j, $raw) = http(POST => $C, { %chat, max_tokens => 1,
    messages => [@user,
        { role => 'assistant', content => undef, tool_calls => [
            { id => 'call_deep', type => 'function', function => {
                name => 'get_weather', arguments => $deep } }] },
        { role => 'tool', tool_call_id => 'call_deep', content => '22C' }],
    tools => [$weather] });
ok($st == 200 || $st == 400,
   'tool call arguments nested 400000 deep: an answer (200 or 400), '
   . "not a dead worker (status $st)") or diag substr($raw // '', 0, 300);
($st) = http(POST => $C, { %chat, max_tokens => 1 });
is($st, 200, 'the next request after it: 200');

finish();


# json.dumps() of a hash as transformers' tojson writes it: ", " and ": "
# separators, keys in the request's order (here: JSON::PP canonical would
# sort them, so the tools above are written with sorted keys in mind)
sub json_py {
    my ($v) = @_;
    if (ref $v eq 'HASH') {
        return '{' . join(', ', map { json_py("$_") . ': ' . json_py($v->{$_}) }
            sort keys %$v) . '}';
    }
    if (ref $v eq 'ARRAY') {
        return '[' . join(', ', map { json_py($_) } @$v) . ']';
    }
    if (JSON::PP::is_bool($v)) {
        return $v ? 'true' : 'false';
    }
    return JSON::PP->new->allow_nonref->encode($v);
}

# '' when $v is valid under the small JSON Schema subset used above
sub validate {
    my ($v, $sc) = @_;
    my $t = $sc->{type} // '';
    if ($t eq 'object') {
        return 'not an object' unless ref $v eq 'HASH';
        for my $r (@{ $sc->{required} // [] }) {
            return "missing $r" unless exists $v->{$r};
        }
        for my $k (keys %$v) {
            my $p = $sc->{properties}{$k};
            return "extra key $k" unless $p;
            my $e = validate($v->{$k}, $p);
            return "$k: $e" if $e ne '';
        }
        return '';
    }
    if ($t eq 'string') {
        return 'not a string' if ref $v || !defined $v;
        return "not one of the enum" if $sc->{enum}
            && !grep { $_ eq $v } @{ $sc->{enum} };
        return '';
    }
    if ($t eq 'integer') {
        return 'not an integer' unless defined $v && !ref $v
            && $v =~ /\A-?\d+\z/;
        return "not one of the enum" if $sc->{enum}
            && !grep { $_ == $v } @{ $sc->{enum} };
        return '';
    }
    return '';
}
