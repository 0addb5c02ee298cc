#!/usr/bin/perl
# Nothing silently ignored: every OpenAI / vLLM request field the server
# does not honour yet is a 400 naming it (param) when it holds a value that
# changes the output, and accepted when its value means "off"; wrong types
# are a 400 naming the field.  Honoured: guided decoding (guided_*,
# response_format json_object / json_schema: accepted here, their output
# checked in http_guided.t), logit_bias (+100 forces a token,
# -100 bans the greedy one, greedy and sampled, completions and chat; bad
# keys / values refused), stop_token_ids (checked in http_stop.t; here its
# type errors), content given as an array of text parts (same prompt as the
# joined string; other part types refused), max_completion_tokens,
# stream_options.continuous_usage_stats (with include_usage, as vLLM: usage
# in every chunk, counting up to the final usage).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my $T = JSON::PP::true;
my $F = JSON::PP::false;
my $C = '/v1/chat/completions';
my $P = '/v1/completions';
my %chat = (model => $M, messages => [{ role => 'user', content => 'hi' }],
            max_tokens => 2);
my %cmp  = (model => $M, prompt => 'hi', max_tokens => 2);
my $fn = { type => 'function',
           function => { name => 'f', parameters => { type => 'object' } } };

# [ what, path, body, param ] refused with 400 and error.param == param;
# the message says "not supported" unless it is a type error (last 'type')
my @refused = (
    # tools are honoured (t/http_tools.t); their wrong shapes stay 400s
    ['tools wrong type', $C, { %chat, tools => 'x' }, 'tools', 'type'],
    ['tool_choice required without tools', $C,
        { %chat, tool_choice => 'required' }, 'tool_choice', 'type'],
    ['tool_choice naming a function without tools', $C, { %chat,
        tool_choice => { type => 'function', function => { name => 'f' } } },
        'tool_choice', 'type'],
    ['tool_choice bad string', $C, { %chat, tool_choice => 'always' },
        'tool_choice', 'type'],
    ['tool_choice wrong type', $C, { %chat, tool_choice => 5 },
        'tool_choice', 'type'],
    ['function_call naming a function without functions', $C,
        { %chat, function_call => { name => 'f' } }, 'function_call',
        'type'],
    ['function_call wrong type', $C, { %chat, function_call => 1 },
        'function_call', 'type'],
    ['web_search_options', $C, { %chat, web_search_options => {} },
        'web_search_options'],
    ['reasoning_effort', $C, { %chat, reasoning_effort => 'high' },
        'reasoning_effort'],
    ['verbosity', $C, { %chat, verbosity => 'low' }, 'verbosity'],
    ['service_tier wrong type', $C, { %chat, service_tier => 1 },
        'service_tier', 'type'],
    ['input_audio content part', $C, { %chat, messages => [{ role => 'user',
        content => [{ type => 'input_audio', input_audio =>
            { data => 'AAAA', format => 'wav' } }] }] }, 'messages', 'type'],
    ['response_format wrong type', $C, { %chat, response_format => 5 },
        'response_format', 'type'],
    ['response_format unknown type', $C,
        { %chat, response_format => { type => 'yaml' } },
        'response_format', 'type'],
    # n and best_of are honoured (t/http_n.t); their bad values here
    ['best_of 2 on chat', $C, { %chat, best_of => 2 }, 'best_of'],
    ['best_of below n', $P, { %cmp, n => 3, best_of => 2 }, 'best_of',
        'type'],
    ['best_of with stream', $P, { %cmp, best_of => 2, stream => $T },
        'best_of', 'type'],
    ['n 0', $C, { %chat, n => 0 }, 'n', 'type'],
    ['n 17', $C, { %chat, n => 17 }, 'n', 'type'],
    ['n wrong type', $P, { %cmp, n => 'two' }, 'n', 'type'],
    ['best_of 0', $P, { %cmp, best_of => 0 }, 'best_of', 'type'],
    ['best_of wrong type', $P, { %cmp, best_of => 'two' }, 'best_of',
        'type'],
    ['suffix', $P, { %cmp, suffix => ' the end' }, 'suffix'],
    ['suffix wrong type', $P, { %cmp, suffix => 3 }, 'suffix', 'type'],
    ['echo on chat', $C, { %chat, echo => $T }, 'echo'],
    ['echo wrong type', $C, { %chat, echo => 'yes' }, 'echo', 'type'],
    # logprobs / top_logprobs / echo on completions are honoured
    # (t/http_logprobs.t); their bad values here
    ['logprobs wrong type (chat)', $C, { %chat, logprobs => 'x' },
        'logprobs', 'type'],
    ['logprobs wrong type (completions)', $P, { %cmp, logprobs => 'x' },
        'logprobs', 'type'],
    ['logprobs 6 (completions)', $P, { %cmp, logprobs => 6 },
        'logprobs', 'type'],
    ['top_logprobs 3 without logprobs', $C, { %chat, top_logprobs => 3 },
        'top_logprobs', 'type'],
    ['top_logprobs 21', $C, { %chat, logprobs => $T, top_logprobs => 21 },
        'top_logprobs', 'type'],
    ['top_logprobs on completions', $P, { %cmp, top_logprobs => 2 },
        'top_logprobs', 'type'],
    ['top_logprobs wrong type', $C, { %chat, top_logprobs => 'x' },
        'top_logprobs', 'type'],
    ['echo with token ids', $P, { %cmp, prompt => [1, 2], echo => $T },
        'echo', 'type'],
    ['min_tokens 3', $P, { %cmp, min_tokens => 3 }, 'min_tokens'],
    ['audio', $C, { %chat, audio => { voice => 'alloy', format => 'wav' } },
        'audio'],
    ['modalities audio', $C, { %chat, modalities => ['text', 'audio'] },
        'modalities'],
    ['modalities wrong type', $C, { %chat, modalities => 'text' },
        'modalities', 'type'],
    ['prediction', $C, { %chat, prediction =>
        { type => 'content', content => 'x' } }, 'prediction'],
    ['guided_json wrong type', $C, { %chat, guided_json => 5 },
        'guided_json', 'type'],
    ['guided_choice wrong type', $P, { %cmp, guided_choice => 'a' },
        'guided_choice', 'type'],
    ['prompt_logprobs', $P, { %cmp, prompt_logprobs => 1 },
        'prompt_logprobs'],
    ['continuous_usage_stats wrong type', $C, { %chat, stream => $T,
        stream_options => { continuous_usage_stats => 'x' } },
        'stream_options', 'type'],
    ['parallel_tool_calls wrong type', $C,
        { %chat, parallel_tool_calls => 'x' }, 'parallel_tool_calls', 'type'],
    ['user wrong type', $C, { %chat, user => 5 }, 'user', 'type'],
    ['metadata wrong type', $C, { %chat, metadata => 'x' }, 'metadata',
        'type'],
    ['logit_bias wrong type', $C, { %chat, logit_bias => 'x' },
        'logit_bias', 'type'],
    ['logit_bias array', $P, { %cmp, logit_bias => [1, 2] }, 'logit_bias',
        'type'],
    ['logit_bias key not an id', $P, { %cmp, logit_bias => { abc => 1 } },
        'logit_bias', 'type'],
    ['logit_bias negative key', $P, { %cmp, logit_bias => { '-1' => 1 } },
        'logit_bias', 'type'],
    ['logit_bias key past the vocabulary', $P,
        { %cmp, logit_bias => { '99999999' => 1 } }, 'logit_bias', 'type'],
    ['logit_bias value 101', $P, { %cmp, logit_bias => { '5' => 101 } },
        'logit_bias', 'type'],
    ['logit_bias value -100.5', $P,
        { %cmp, logit_bias => { '5' => -100.5 } }, 'logit_bias', 'type'],
    ['logit_bias value a string', $P, { %cmp, logit_bias => { '5' => '1' } },
        'logit_bias', 'type'],
    ['logit_bias over 300 entries', $P,
        { %cmp, logit_bias => { map { ($_ => 1) } 0 .. 300 } },
        'logit_bias', 'type'],
    ['stop_token_ids wrong type', $P, { %cmp, stop_token_ids => 5 },
        'stop_token_ids', 'type'],
    ['stop_token_ids not ids', $P, { %cmp, stop_token_ids => ['a'] },
        'stop_token_ids', 'type'],
    ['image_url content part', $C, { %chat, messages => [{ role => 'user',
        content => [{ type => 'text', text => 'what is this?' },
                    { type => 'image_url',
                      image_url => { url => 'http://x/y.png' } }] }] },
        'messages', 'type'],
    ['content part without text', $C, { %chat, messages => [{ role => 'user',
        content => [{ type => 'text' }] }] }, 'messages', 'type'],
    ['max_completion_tokens 0', $C, { %chat, max_completion_tokens => 0 },
        'max_completion_tokens', 'type'],
    ['max_completion_tokens wrong type', $C,
        { %chat, max_completion_tokens => 'x' }, 'max_completion_tokens',
        'type'],
);

for my $c (@refused) {
    my ($what, $path, $body, $param, $type) = @$c;
    my ($st, undef, $j, $raw) = http(POST => $path, $body);
    is($st, 400, "$what: 400") or diag substr($raw, 0, 300);
    my $e = ref $j eq 'HASH' ? $j->{error} // {} : {};
    is($e->{param}, $param, "$what: param $param");
    if (!$type) {
        like($e->{message} // '', qr/not supported/,
             "$what: says not supported");
    }
}

# values that mean "off" (and fields with no effect on the output): 200
my @accepted = (
    ['tools []', $C, { %chat, tools => [] }],
    ['tools (tool_choice auto)', $C, { %chat, tools => [$fn] }],
    ['functions (function_call auto)', $C,
        { %chat, functions => [$fn->{function}] }],
    ['tool_choice none', $C, { %chat, tool_choice => 'none' }],
    ['tool_choice auto, no tools', $C, { %chat, tool_choice => 'auto' }],
    ['functions [] + function_call none', $C,
        { %chat, functions => [], function_call => 'none' }],
    ['response_format text', $C, { %chat, response_format => { type => 'text' } }],
    # guided decoding is honoured now (t/http_guided.t checks the output)
    ['response_format json_object', $C,
        { %chat, response_format => { type => 'json_object' } }],
    ['response_format json_schema', $P,
        { %cmp, response_format => { type => 'json_schema', json_schema =>
            { name => 'x', schema => { type => 'object' } } } }],
    ['guided_json', $C, { %chat, guided_json => { type => 'object' } }],
    ['guided_regex', $P, { %cmp, guided_regex => 'a+' }],
    ['guided_choice', $P, { %cmp, guided_choice => ['a', 'b'] }],
    ['guided_grammar', $P, { %cmp, guided_grammar => 'root ::= "a"' }],
    ['best_of 1', $P, { %cmp, best_of => 1 }],
    ['echo false (chat)', $C, { %chat, echo => $F }],
    ['echo false (completions)', $P, { %cmp, echo => $F }],
    ['logprobs false', $C, { %chat, logprobs => $F }],
    ['logprobs true', $C, { %chat, logprobs => $T }],
    ['logprobs 2 (completions)', $P, { %cmp, logprobs => 2 }],
    ['echo true (completions)', $P, { %cmp, echo => $T }],
    ['top_logprobs 0', $C, { %chat, top_logprobs => 0 }],
    ['n 1', $C, { %chat, n => 1 }],
    ['suffix null', $P, { %cmp, suffix => undef }],
    ['suffix ""', $P, { %cmp, suffix => '' }],
    ['modalities [text]', $C, { %chat, modalities => ['text'] }],
    ['min_tokens 0', $P, { %cmp, min_tokens => 0 }],
    ['logit_bias {}', $P, { %cmp, logit_bias => {} }],
    ['logit_bias null', $C, { %chat, logit_bias => undef }],
    ['continuous_usage_stats false', $C, { %chat, stream => $T,
        stream_options => { continuous_usage_stats => $F } }],
    ['user, metadata, store, parallel_tool_calls', $C, { %chat,
        user => 'u1', metadata => { a => 'b' }, store => $F,
        parallel_tool_calls => $T }],
    ['service_tier, prompt_cache_key, safety_identifier', $C, { %chat,
        service_tier => 'auto', prompt_cache_key => 'k',
        safety_identifier => 's' }],
    ['an unknown field (ignored, as before)', $P,
        { %cmp, x_vendor_extension => 1 }],
);

for my $c (@accepted) {
    my ($what, $path, $body) = @$c;
    my ($st, undef, undef, $raw) = http(POST => $path, $body);
    is($st, 200, "$what: 200") or diag substr($raw, 0, 300);
}

# --- logit_bias end to end ---------------------------------------------

# a prompt whose greedy first token is printable ASCII and one token
my (%g, $st, $j, $t1, $ban);
for my $p ('The quick brown fox', 'Hello', 'In the beginning', 'def main():',
           'Once upon a time', '1 2 3 4') {
    %g = (model => $M, prompt => $p, temperature => 0, max_tokens => 1);
    ($st, undef, $j) = http(POST => $P, \%g);
    $t1 = $j->{choices}[0]{text} // '';
    next unless $st == 200 && $t1 =~ /\A[\x20-\x7e]+\z/;
    $ban = tokenize($t1, add_special_tokens => $F)->{tokens};
    last if @$ban == 1;
    $ban = undef;
}
ok($ban, "a prompt with a one-token ASCII greedy first token ('$t1')");
$ban //= [0];

($st, undef, $j) = http(POST => $P, { %g, logit_bias => { $ban->[0] => -100 } });
is($st, 200, 'logit_bias -100 on the greedy token: 200');
isnt($j->{choices}[0]{text}, $t1,
     "logit_bias -100 on the greedy token $ban->[0] changes it");

# a token to force: the last one of a word, not the greedy token
my $word = tokenize(' elephant', add_special_tokens => $F)->{tokens};
my ($x) = grep { my $i = $_; !grep { $_ == $i } @$ban } reverse @$word;
my ($ds, undef, $dj) = http(POST => '/detokenize', { tokens => [($x) x 4] });
is($ds, 200, 'detokenize 4 x the forced token');
my $want = $dj->{prompt};

for my $temp (0, 1) {
    ($st, undef, $j) = http(POST => $P, { %g, max_tokens => 4,
        ignore_eos => $T, temperature => $temp, seed => 7,
        logit_bias => { $x => 100 } });
    is($st, 200, "logit_bias +100, temperature $temp: 200");
    is($j->{choices}[0]{text}, $want,
       "logit_bias +100 forces token $x 4 times, temperature $temp");
    is($j->{usage}{completion_tokens}, 4, 'usage: 4 tokens');
}

($st, undef, $j) = http(POST => $C, { %chat, max_tokens => 4,
    ignore_eos => $T, temperature => 0, logit_bias => { "$x" => 100 } });
is($st, 200, 'chat logit_bias +100: 200');
is($j->{choices}[0]{message}{content}, $want,
   'chat: logit_bias +100 forces the token');

{
    my $x2 = sse($C, { %chat, max_tokens => 4, ignore_eos => $T,
        temperature => 0, stream => $T, logit_bias => { $x => 100 } });
    is($x2->text, $want, 'streamed chat: logit_bias +100 forces the token');
}

# --- content as text parts == the joined string ------------------------

{
    my %b = (model => $M, max_tokens => 6, temperature => 0);
    my ($s1, undef, $j1) = http(POST => $C, { %b, messages =>
        [{ role => 'user', content => "Hello there\nhow are you" }] });
    my ($s2, undef, $j2) = http(POST => $C, { %b, messages =>
        [{ role => 'user', content => [
            { type => 'text', text => 'Hello there' },
            { type => 'text', text => 'how are you' }] }] });
    is($s1, 200, 'content string: 200');
    is($s2, 200, 'content text parts: 200');
    is($j2->{usage}{prompt_tokens}, $j1->{usage}{prompt_tokens},
       'text parts: the same prompt tokens as the parts joined by \n');
    is($j2->{choices}[0]{message}{content}, $j1->{choices}[0]{message}{content},
       'text parts: the same greedy output');
}

# --- stream_options.continuous_usage_stats --------------------------------

for my $path ($C, $P) {
    my $base = $path eq $C ? \%chat : \%cmp;
    my $x3 = sse($path, { %$base, max_tokens => 5, ignore_eos => $T,
        temperature => 0, stream => $T,
        stream_options => { include_usage => $T,
                            continuous_usage_stats => $T } });
    my @ch = $x3->chunks;
    ok(@ch >= 6, "$path continuous usage: a chunk per token and the usage "
       . "chunk (" . scalar(@ch) . ')');
    my ($all, $up, $last) = (1, 1, -1);
    for my $c (@ch) {
        my $u = $c->{usage};
        $all &&= ref $u eq 'HASH' && defined $u->{completion_tokens}
                 && $u->{total_tokens}
                    == $u->{prompt_tokens} + $u->{completion_tokens};
        last unless $all;
        $up &&= $u->{completion_tokens} >= $last;
        $last = $u->{completion_tokens};
    }
    ok($all, "$path continuous usage: every chunk carries usage");
    ok($up, "$path continuous usage: completion_tokens never goes down");
    is($last, 5, "$path continuous usage: ends at 5 completion tokens");
    ok((grep { @{ $_->{choices} // [] } && $_->{usage}
               && $_->{usage}{completion_tokens} > 0 } @ch) >= 3,
       "$path continuous usage: token chunks count their tokens");

    # without include_usage it has no effect (vLLM), chunks keep no usage
    my $x4 = sse($path, { %$base, stream => $T,
        stream_options => { continuous_usage_stats => $T } });
    ok(!grep({ exists $_->{usage} } $x4->chunks),
       "$path continuous_usage_stats alone: no usage (as vLLM)");
}

# --- max_completion_tokens is honoured (and wins over max_tokens) -------

($st, undef, $j) = http(POST => $C, { %chat, max_tokens => 9,
    max_completion_tokens => 3, ignore_eos => $T });
is($st, 200, 'max_completion_tokens: 200');
is($j->{usage}{completion_tokens}, 3,
   'max_completion_tokens 3 gives 3 tokens (over max_tokens 9)');

finish();
