#!/usr/bin/perl
# Streaming (SSE) for chat and completions: headers, exact `data: {json}\n\n`
# framing over chunked transfer encoding, chunk shapes (role first, content
# deltas, final finish_reason with an empty delta, `data: [DONE]` last),
# streamed text == non-stream text for the same greedy request, one event
# per token, and stream_options.include_usage.
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
my @msgs = ({ role => 'user', content => 'Tell me a story about a robot.' });
my $N = 10;

sub check_framing {
    my ($x, $what) = @_;
    is($x->status, 200, "$what: 200") or diag $x->summary;
    like($x->header('content-type') // '', qr{^text/event-stream},
         "$what: Content-Type text/event-stream");
    is($x->header('x-accel-buffering'), 'no', "$what: X-Accel-Buffering: no");
    like($x->header('transfer-encoding') // '', qr/chunked/i,
         "$what: chunked transfer encoding");
    ok(!defined $x->header('content-length'), "$what: no Content-Length");
    is_deeply([ $x->errors ], [], "$what: framing is exactly data: ...\\n\\n")
        or diag $x->summary;
    ok($x->done, "$what: last event is exactly data: [DONE]");
    is($x->{sbuf}, '', "$what: nothing after the last blank line");
}

# ---- chat
my $chat = { model => $M, messages => \@msgs, max_tokens => $N,
             temperature => 0 };
my ($st, undef, $ns) = http(POST => '/v1/chat/completions', $chat);
is($st, 200, 'chat non-stream: 200') or diag explain $ns;
my $ns_text = $ns->{choices}[0]{message}{content} // '';

my $x = sse('/v1/chat/completions', { %$chat, stream => $T });
check_framing($x, 'chat stream');
my @c = $x->chunks;
ok(@c >= 3, 'chat stream: at least 3 chunks') or diag $x->summary;
my %ids = map { ($_->{id} // '') => 1 } @c;
is(scalar keys %ids, 1, 'chat stream: one id for all chunks');
like((keys %ids)[0], qr/^chatcmpl-/, 'chat stream: id starts with chatcmpl-');
is(scalar(grep { ($_->{object} // '') ne 'chat.completion.chunk' } @c), 0,
   'chat stream: every object is chat.completion.chunk');
is(scalar(grep { ($_->{model} // '') ne $M } @c), 0,
   'chat stream: every chunk names the model');
is($c[0]{choices}[0]{delta}{role}, 'assistant',
   'first chunk: delta.role assistant');
my $last = $c[-1];
ok(defined $last->{choices}[0]{finish_reason},
   'final chunk: finish_reason set') or diag explain $last;
is_deeply($last->{choices}[0]{delta}, {}, 'final chunk: empty delta')
    or diag explain $last;
my @mid = @c[1 .. $#c - 1];
is(scalar(grep { !defined $_->{choices}[0]{delta}{content} } @mid), 0,
   'intermediate chunks carry delta.content');
is(scalar(grep { defined $_->{choices}[0]{finish_reason} } @c[0 .. $#c - 1]),
   0, 'only the final chunk has a finish_reason');
my $content_events = grep { length($_->{choices}[0]{delta}{content} // '') } @c;
cmp_ok($content_events, '>', 1,
       "tokens arrive as separate events ($content_events content events)");
is($x->text, $ns_text, 'chat: streamed text == non-stream text (greedy)');
is($x->finish_reason, $ns->{choices}[0]{finish_reason},
   'chat: same finish_reason as non-stream');
ok(!grep({ defined $_->{usage} } @c), 'no usage without include_usage');
diag(sprintf 'chat stream: %d events, first at %.3fs, last at %.3fs',
     scalar($x->events), ($x->events)[0]{t}, ($x->events)[-1]{t});

# ---- chat with include_usage
my $xu = sse('/v1/chat/completions', { %$chat, stream => $T,
    stream_options => { include_usage => $T } });
check_framing($xu, 'chat stream+usage');
my @cu = $xu->chunks;
my $uc = $cu[-1];
is_deeply($uc->{choices}, [], 'include_usage: last chunk has choices []')
    or diag explain $uc;
my $u = $uc->{usage} // {};
is($u->{prompt_tokens}, $ns->{usage}{prompt_tokens},
   'include_usage: prompt_tokens as non-stream');
is($u->{completion_tokens}, $ns->{usage}{completion_tokens},
   'include_usage: completion_tokens as non-stream');
is($u->{total_tokens}, ($u->{prompt_tokens} // 0) + ($u->{completion_tokens} // 0),
   'include_usage: total is the sum');
is(scalar(grep { defined $_->{usage} } @cu[0 .. $#cu - 1]), 0,
   'include_usage: other chunks have usage null or absent');
is($xu->text, $ns_text, 'include_usage: same text');

# ---- completions
my $cmp = { model => $M, prompt => 'Once upon a time there was',
            max_tokens => $N, temperature => 0 };
my ($st2, undef, $ns2) = http(POST => '/v1/completions', $cmp);
is($st2, 200, 'completion non-stream: 200') or diag explain $ns2;
my $y = sse('/v1/completions', { %$cmp, stream => $T });
check_framing($y, 'completion stream');
my @d = $y->chunks;
is(scalar(grep { ($_->{object} // '') ne 'text_completion' } @d), 0,
   'completion stream: every object is text_completion');
like($d[0]{id} // '', qr/^cmpl-/, 'completion stream: id starts with cmpl-');
is(scalar(grep { !defined $_->{choices}[0]{text} } @d), 0,
   'completion stream: every chunk has choices[0].text');
is($y->text, $ns2->{choices}[0]{text},
   'completion: streamed text == non-stream text (greedy)');
is($y->finish_reason, $ns2->{choices}[0]{finish_reason},
   'completion: same finish_reason');
ok(defined $d[-1]{choices}[0]{finish_reason},
   'completion stream: last chunk has finish_reason');
my $text_events = grep { length($_->{choices}[0]{text} // '') } @d;
cmp_ok($text_events, '>', 1,
       "completion tokens arrive as separate events ($text_events)");

my $yu = sse('/v1/completions', { %$cmp, stream => $T,
    stream_options => { include_usage => $T } });
check_framing($yu, 'completion stream+usage');
my $cu2 = ($yu->chunks)[-1];
is_deeply($cu2->{choices}, [], 'completion include_usage: choices []');
is($cu2->{usage}{completion_tokens}, $ns2->{usage}{completion_tokens},
   'completion include_usage: completion_tokens as non-stream');
is($cu2->{usage}{prompt_tokens}, $ns2->{usage}{prompt_tokens},
   'completion include_usage: prompt_tokens as non-stream');

# stream false is the plain JSON answer
my ($st3, $h3, $j3) = http(POST => '/v1/completions',
    { %$cmp, stream => JSON::PP::false });
is($st3, 200, 'stream false: 200');
like($h3->{'content-type'} // '', qr{^application/json}, 'stream false: JSON');

finish();
