#!/usr/bin/perl
# POST /v1/completions (non-stream): OpenAI response shape, finish_reason
# "length", usage counts agreeing with /tokenize, a prompt given as token ids
# producing the same greedy text as the same prompt as a string, echo false.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use LocalMoE::Test;

my $s = start_server();
my $M = model_id();
my $prompt = 'The quick brown fox jumps over the lazy dog. Once upon a time';

my $tok = tokenize($prompt, add_special_tokens => JSON::PP::true);
my $n_prompt = $tok->{count};
ok($n_prompt && $n_prompt == @{ $tok->{tokens} }, "/tokenize count $n_prompt");

my $req = { model => $M, prompt => $prompt, max_tokens => 5,
            temperature => 0 };
my ($st, $h, $j) = http(POST => '/v1/completions', $req);
is($st, 200, 'completion: 200') or diag explain $j;
like($h->{'content-type'} // '', qr{^application/json}, 'Content-Type json');
is($j->{object}, 'text_completion', 'object text_completion');
like($j->{id} // '', qr/^cmpl-\S+$/, 'id starts with cmpl-');
like($j->{created} // '', qr/^\d{9,}$/, 'created is a unix time');
is($j->{model}, $M, 'model echoes the served model');
is(ref $j->{choices}, 'ARRAY', 'choices is an array');
is(scalar @{ $j->{choices} // [] }, 1, 'one choice');
my $c = $j->{choices}[0] // {};
is($c->{index}, 0, 'choices[0].index 0');
ok(defined $c->{text} && !ref $c->{text}, 'choices[0].text is a string');
is($c->{finish_reason}, 'length', 'finish_reason length (max_tokens 5)')
    or diag "completion_tokens: $j->{usage}{completion_tokens}";
my $u = $j->{usage} // {};
is($u->{prompt_tokens}, $n_prompt, 'usage.prompt_tokens == /tokenize count');
is($u->{completion_tokens}, 5, 'usage.completion_tokens == max_tokens');
is($u->{total_tokens}, ($u->{prompt_tokens} // 0) + ($u->{completion_tokens} // 0),
   'usage.total_tokens is the sum');
my $text = $c->{text};

# greedy is deterministic
my (undef, undef, $j2) = http(POST => '/v1/completions', $req);
is($j2->{choices}[0]{text}, $text, 'greedy repeat: same text');
isnt($j2->{id}, $j->{id}, 'a new id per request');

# prompt as token ids: the same tokens as the string prompt gets
my ($st3, undef, $j3) = http(POST => '/v1/completions',
    { %$req, prompt => $tok->{tokens} });
is($st3, 200, 'prompt as an array of token ids: 200') or diag explain $j3;
is($j3->{choices}[0]{text}, $text, 'token-id prompt: same greedy text');
is($j3->{usage}{prompt_tokens}, $n_prompt, 'token-id prompt: prompt_tokens');

# echo false is accepted (and does not echo)
my ($st4, undef, $j4) = http(POST => '/v1/completions',
    { %$req, echo => JSON::PP::false });
is($st4, 200, 'echo false: 200') or diag explain $j4;
is($j4->{choices}[0]{text}, $text, 'echo false: text without the prompt');

# longer generation: completion_tokens tracks max_tokens
my ($st5, undef, $j5) = http(POST => '/v1/completions',
    { %$req, max_tokens => 12 });
is($st5, 200, 'max_tokens 12: 200');
if (($j5->{choices}[0]{finish_reason} // '') eq 'length') {
    is($j5->{usage}{completion_tokens}, 12, 'max_tokens 12: 12 tokens');
} else {
    cmp_ok($j5->{usage}{completion_tokens}, '<', 12,
           'stopped early (EOS): fewer tokens than max_tokens');
}
# (a cut-off UTF-8 tail decodes to U+FFFD, so compare without it)
(my $head = $text) =~ s/\x{FFFD}+\z//;
is(substr($j5->{choices}[0]{text}, 0, length $head), $head,
   'greedy text with max_tokens 12 extends the max_tokens 5 text');

finish();
