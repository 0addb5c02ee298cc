#!/usr/bin/perl
# POST /v1/chat/completions (non-stream): OpenAI response shape, assistant
# message, usage.prompt_tokens agreeing with /tokenize of the same messages,
# and the prompt being ChatML (the tiny model's chat_template).
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my @msgs = (
    { role => 'system', content => 'You are a terse assistant.' },
    { role => 'user',   content => 'Name three colours, héllo 世界.' },
);

my $tok = tokenize({ messages => \@msgs,
                     add_generation_prompt => JSON::PP::true });
ok($tok->{count} && $tok->{count} == @{ $tok->{tokens} },
   "/tokenize messages: count $tok->{count}");

# ChatML rendering: the same tokens as the ChatML text (special tokens
# are matched in text whatever add_special_tokens says)
my $chatml = join('', map { "<|im_start|>$_->{role}\n$_->{content}<|im_end|>\n" }
                  @msgs) . "<|im_start|>assistant\n";
my $tok2 = tokenize($chatml, add_special_tokens => JSON::PP::false);
is_deeply($tok->{tokens}, $tok2->{tokens},
          'chat prompt tokens == tokens of the ChatML text');
my $im_start = tokenize('<|im_start|>', add_special_tokens => JSON::PP::false);
is(scalar @{ $im_start->{tokens} }, 1, '<|im_start|> is one special token');
is($tok->{tokens}[0], $im_start->{tokens}[0], 'chat prompt starts with it');

my $req = { model => $M, messages => \@msgs, max_tokens => 6,
            temperature => 0 };
my ($st, $h, $j) = http(POST => '/v1/chat/completions', $req);
is($st, 200, 'chat completion: 200') or diag explain $j;
like($h->{'content-type'} // '', qr{^application/json}, 'Content-Type json');
is($j->{object}, 'chat.completion', 'object chat.completion');
like($j->{id} // '', qr/^chatcmpl-\S+$/, 'id starts with chatcmpl-');
like($j->{created} // '', qr/^\d{9,}$/, 'created is a unix time');
is($j->{model}, $M, 'model echoes the served model');
is(scalar @{ $j->{choices} // [] }, 1, 'one choice');
my $c = $j->{choices}[0] // {};
is($c->{index}, 0, 'choices[0].index 0');
is($c->{message}{role}, 'assistant', 'message.role assistant');
ok(defined $c->{message}{content} && !ref $c->{message}{content},
   'message.content is a string');
like($c->{finish_reason} // '', qr/^(length|stop)$/, 'finish_reason');
my $u = $j->{usage} // {};
is($u->{prompt_tokens}, $tok->{count},
   'usage.prompt_tokens == /tokenize(messages, add_generation_prompt) count');
if (($c->{finish_reason} // '') eq 'length') {
    is($u->{completion_tokens}, 6, 'completion_tokens == max_tokens');
} else {
    cmp_ok($u->{completion_tokens}, '<=', 6, 'completion_tokens <= max_tokens');
}
is($u->{total_tokens}, ($u->{prompt_tokens} // 0) + ($u->{completion_tokens} // 0),
   'usage.total_tokens is the sum');

# the chat request is the completion of the rendered prompt
my ($st2, undef, $j2) = http(POST => '/v1/completions',
    { model => $M, prompt => $tok->{tokens}, max_tokens => 6,
      temperature => 0 });
is($st2, 200, 'completion of the chat prompt tokens: 200');
is($j2->{choices}[0]{text}, $c->{message}{content},
   'chat content == completion of the same prompt tokens (greedy)');

# a multi-turn conversation with an assistant turn
my ($st3, undef, $j3) = http(POST => '/v1/chat/completions',
    { model => $M, max_tokens => 3, temperature => 0, messages => [
        @msgs, { role => 'assistant', content => 'Red, green, blue.' },
        { role => 'user', content => 'More?' } ] });
is($st3, 200, 'multi-turn chat: 200') or diag explain $j3;
is($j3->{choices}[0]{message}{role}, 'assistant', 'multi-turn: assistant');

# max_completion_tokens (the newer OpenAI name) is honoured
my ($st4, undef, $j4) = http(POST => '/v1/chat/completions',
    { model => $M, messages => \@msgs, max_completion_tokens => 2,
      temperature => 0 });
is($st4, 200, 'max_completion_tokens: 200') or diag explain $j4;
cmp_ok($j4->{usage}{completion_tokens} // 99, '<=', 2,
       'max_completion_tokens 2 limits the output');

finish();
