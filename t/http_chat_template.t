#!/usr/bin/perl
# Chat requests rendered with the model's own chat_template (Jinja subset):
# a copy of the tiny model whose tokenizer_config.json carries the real
# Mistral-Instruct template; the prompt tokens equal the tokens of the text
# that template produces, and a conversation the template rejects
# (raise_exception: roles must alternate) is a 400 naming the reason while
# the server keeps serving.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use File::Temp qw(tempdir);
use LocalMoE::Test;

my $root = "$FindBin::Bin/..";
my $src  = "$root/models/localmoe-tiny";
my $dir  = tempdir('localmoe-tmpl-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
for my $f (qw(config.json generation_config.json model.safetensors
              tokenizer.json)) {
    symlink("$src/$f", "$dir/$f") or die "symlink $f: $!";
}
open my $fh, '<', "$root/t/data/chat/templates/mistral-7b-instruct.jinja"
    or die $!;
my $tmpl = do { local $/; <$fh> };
close $fh;
my $cfg = decode_json(do { local $/; open my $c, '<', "$src/tokenizer_config.json"
                           or die $!; <$c> });
$cfg->{chat_template} = $tmpl;
open my $out, '>', "$dir/tokenizer_config.json" or die $!;
print $out encode_json($cfg);
close $out;
chmod 0644, "$dir/tokenizer_config.json";

my $s = start_server(vllm => { model_name => $dir });
my $M = model_id();

my @msgs = ({ role => 'user', content => 'Hello there' },
            { role => 'assistant', content => 'Hi' },
            { role => 'user', content => 'Again' });
my $want = "<|endoftext|>[INST] Hello there [/INST]Hi<|endoftext|> "
         . "[INST] Again [/INST]";
my $tok  = tokenize({ messages => \@msgs,
                      add_generation_prompt => JSON::PP::true });
my $tok2 = tokenize($want, add_special_tokens => JSON::PP::false);
is_deeply($tok->{tokens}, $tok2->{tokens},
          'chat prompt == tokens of the Mistral template rendering');

my ($st, $h, $j) = http(POST => '/v1/chat/completions',
    { model => $M, messages => \@msgs, max_tokens => 4, temperature => 0 });
is($st, 200, 'chat with the model template: 200');
is($j->{usage}{prompt_tokens}, scalar @{ $tok2->{tokens} },
   'usage.prompt_tokens counts the rendered template');

($st, $h, $j) = http(POST => '/v1/chat/completions',
    { model => $M, max_tokens => 4,
      messages => [{ role => 'user', content => 'a' },
                   { role => 'user', content => 'b' }] });
is($st, 400, 'template raise_exception: 400');
like($j->{error}{message} // '', qr/roles must alternate/,
     'error names the template\'s reason');

($st) = http(POST => '/v1/chat/completions',
    { model => $M, messages => [{ role => 'user', content => 'ok' }],
      max_tokens => 2 });
is($st, 200, 'server keeps serving');

finish();
