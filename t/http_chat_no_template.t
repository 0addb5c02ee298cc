#!/usr/bin/perl
# Chat to a model without a chat template (issue 9 item 6b): a copy of the
# tiny model whose tokenizer_config.json has no chat_template.  Chat
# requests and /tokenize of messages are a 400 that names the fix (the
# YAML's chat_template key) instead of a silent ChatML wrapping; plain
# completions still work.  vllm.chat_template then supplies the template,
# inline or as a file next to the YAML, and the prompt is exactly that
# template's rendering; a chat_template that is neither fails nginx -t
# with its line.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use File::Temp qw(tempdir);
use LocalMoE::Test;

LocalMoE::Test::skip_unless_built();

my $src = model_dir();
my $dir = tempdir('localmoe-notmpl-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
for my $f (qw(config.json generation_config.json model.safetensors
              tokenizer.json)) {
    symlink("$src/$f", "$dir/$f") or die "symlink $f: $!";
}
my $cfg = decode_json(slurp("$src/tokenizer_config.json"));
delete $cfg->{chat_template};
LocalMoE::Test::spew("$dir/tokenizer_config.json", encode_json($cfg));

my @msgs = ({ role => 'system', content => 'Be brief.' },
            { role => 'user', content => 'Hello there' });
my $chat = { messages => \@msgs, max_tokens => 3, temperature => 0 };

# 1. no template anywhere
my $s = start_server(vllm => { model_name => $dir });
my $M = model_id();
my ($st, undef, $j) = http(POST => '/v1/chat/completions',
                           { %$chat, model => $M });
is($st, 400, 'chat without a chat template: 400');
is($j->{error}{param}, 'messages', '... param messages');
like($j->{error}{message} // '',
     qr/no chat template.*"chat_template:".*engine\.yaml/,
     '... the message names the fix (chat_template: in the YAML)')
    or diag explain $j;
($st, undef, $j) = http(POST => '/tokenize', { messages => \@msgs });
is($st, 400, '/tokenize of messages without a template: 400');
($st, undef, $j) = http(POST => '/v1/completions',
    { model => $M, prompt => 'Hello', max_tokens => 3, temperature => 0 });
is($st, 200, 'completions still work');
stop_server($s);

# 2. vllm.chat_template, inline and as a file beside the YAML
my $tmpl = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
         . "{% endfor %}{% if add_generation_prompt %}[assistant] "
         . "{% endif %}";
my $want = "[system] Be brief.\n[user] Hello there\n[assistant] ";

for my $how ('inline', 'file') {
    $s = prepare_server(vllm => { model_name => $dir, chat_template =>
        $how eq 'inline' ? $tmpl : 'my-template.jinja' });
    LocalMoE::Test::spew($s->dir . '/my-template.jinja', $tmpl);
    $s->start;
    $LocalMoE::Test::CURRENT = $s;
    ($st, undef, $j) = http(POST => '/v1/chat/completions',
                            { %$chat, model => $M });
    is($st, 200, "chat with vllm.chat_template ($how): 200")
        or diag explain $j;
    my $tok = tokenize($want, add_special_tokens => JSON::PP::false);
    is($j->{usage}{prompt_tokens}, $tok->{count},
       "... the prompt is that template's rendering ($how)");
    my $t2 = tokenize({ messages => \@msgs,
                        add_generation_prompt => JSON::PP::true });
    is_deeply($t2->{tokens}, $tok->{tokens},
              "... /tokenize of the messages agrees ($how)");
    stop_server($s);
}

# 3. neither a template nor a file
$s = prepare_server(vllm => { model_name => $dir,
                              chat_template => 'no-such-template.jinja' });
my @l = split /\n/, slurp($s->dir . '/engine.yaml');
my ($line) = grep { $l[$_ - 1] =~ /chat_template:/ } 1 .. @l;
my ($rc, $out) = nginx_test($s);
isnt($rc, 0, 'nginx -t fails for a chat_template that is no file');
like($out, qr/engine\.yaml:$line: chat_template 'no-such-template\.jinja'/,
     "... naming engine.yaml:$line") or diag $out;

finish();
