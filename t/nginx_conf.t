#!/usr/bin/perl
# Configuration checks at `nginx -t` time: an engine YAML with an unknown
# key, a wrong-type value, an out-of-range value, an unknown section, broken
# YAML syntax or a missing model fails with the YAML file and :line: in the
# message; valid YAMLs (ours and the seed's config.yaml layout) pass; and
# worker_processes 2 is refused with a message that names it.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LocalMoE::Test;

-f so_path() or plan skip_all => so_path() . ' not built (run make)';
my $model = model_dir();

sub yaml_lines {
    my (@l) = @_;
    return join '', map { "$_\n" } @l;
}

# [ what, yaml text, expected line or undef for success ]
my @cases = (
    ['unknown key', yaml_lines(
        'vllm:',
        qq(  model_name: "$model"),
        '  max_model_len: 256',
        '  bogus_key: 7',
        'engine:',
        '  backend: cpu'), 4, qr/bogus_key/],
    ['wrong type', yaml_lines(
        'engine:',
        '  backend: cpu',
        'vllm:',
        qq(  model_name: "$model"),
        '  block_size: 16',
        '  max_model_len: lots'), 6, qr/max_model_len/],
    ['list where a number goes', yaml_lines(
        'engine:',
        '  backend: cpu',
        'vllm:',
        qq(  model_name: "$model"),
        '  max_num_seqs: [1, 2]'), 5, qr/max_num_seqs/],
    ['out of range', yaml_lines(
        'vllm:',
        qq(  model_name: "$model"),
        '  gpu_memory_utilization: 1.5',
        'engine:',
        '  backend: cpu'), 3, qr/gpu_memory_utilization/],
    ['bad enum value', yaml_lines(
        'engine:',
        '  backend: quantum',
        'vllm:',
        qq(  model_name: "$model")), 2, qr/backend/],
    ['unknown section', yaml_lines(
        'vllm:',
        qq(  model_name: "$model"),
        'engine:',
        '  backend: cpu',
        'frobnicate:',
        '  a: 1'), 5, qr/frobnicate/],
    ['broken YAML', yaml_lines(
        'vllm:',
        qq(  model_name: "$model"),
        '  max_model_len: [256',
        'engine:',
        '  backend: cpu'), undef, undef, 1],
    ['missing model', yaml_lines(
        'engine:',
        '  backend: cpu',
        'vllm:',
        '  model_name: "/nonexistent/localmoe/model"'), 4, qr/nonexistent/],
    ['valid', yaml_lines(
        '# LocalMoE test engine',
        'engine:',
        '  backend: cpu',
        'vllm:',
        qq(  model_name: "$model"),
        '  max_model_len: 256',
        '  block_size: 16',
        '  max_num_seqs: 8'), undef],
    ['valid with UTF-8 comments', yaml_lines(
        '# 模型配置 (the seed was written in Chinese)',
        'vllm:',
        qq(  model_name: "$model"   # 实际使用的模型路径),
        '  max_model_len: 512       # 最大模型长度',
        'engine:',
        '  backend: cpu'), undef],
    # the seed's configs/config.yaml, only model_name pointing at our model
    ['seed config.yaml layout', yaml_lines(
        '# model configuration',
        'model:',
        '  num_experts: 8              # number of MoE experts',
        '  top_k_experts: 2            # experts activated per token',
        '  hidden_size: 768            # hidden size',
        '  intermediate_size: 3072     # FFN intermediate size',
        '  max_sequence_length: 2048   # maximum sequence length',
        '  quantization_type: "fp16"   # weight precision',
        '  enable_compilation: true    # enable compilation optimisations',
        '',
        '# vLLM configuration (the model actually served)',
        'vllm:',
        qq(  model_name: "$model"),
        '  tensor_parallel_size: 4                   # 4 GPUs in parallel',
        '  gpu_memory_utilization: 0.9              # share of GPU memory',
        '  max_model_len: 2048                      # maximum model length',
        '  block_size: 16                           # KV block size',
        '  swap_space: 4                            # swap space (GB)',
        '  max_num_batched_tokens: 8192             # max tokens per batch',
        '  enable_prefix_caching: true              # prefix caching',
        '  quantization: null                       # quantization method'),
        undef],
    ['seed tuning keys', yaml_lines(
        'vllm:',
        qq(  model_name: "$model"),
        '  gpu_memory_utilization: 0.85',
        '  enable_prefix_caching: true',
        '  use_v2_block_manager: true',
        '  max_num_batched_tokens: 16384',
        '  max_num_seqs: 256',
        '  enable_chunked_prefill: true',
        '  max_chunked_prefill_tokens: 1024',
        '  trust_remote_code: false',
        '  load_format: "auto"'), undef],
);

for my $c (@cases) {
    my ($what, $yaml, $line, $re, $any_fail) = @$c;
    my $s = prepare_server(yaml_raw => $yaml);
    my $file = $s->dir . '/engine.yaml';
    my ($rc, $out) = nginx_test($s);
    if (!defined $line && !$any_fail) {
        is($rc, 0, "$what: nginx -t passes") or diag $out;
        like($out, qr/test is successful/, "$what: test is successful");
        next;
    }
    isnt($rc, 0, "$what: nginx -t fails") or diag $out;
    like($out, qr/\[emerg\]/, "$what: an emerg message") or diag $out;
    like($out, qr/\Q$file\E/, "$what: names the YAML file") or diag $out;
    next unless defined $line;
    like($out, qr/\Q$file\E:$line:/, "$what: points at $file:$line:")
        or diag $out;
    like($out, $re, "$what: names the key") if $re;
}

# worker_processes 2 is refused
{
    my $s = prepare_server(worker_processes => 2);
    my ($rc, $out) = nginx_test($s);
    isnt($rc, 0, 'worker_processes 2: nginx -t fails') or diag $out;
    like($out, qr/worker_processes/, 'worker_processes 2: message names it')
        or diag $out;
}
{
    my $s = prepare_server(worker_processes => 'auto');
    my ($rc, $out) = nginx_test($s);
    # nginx counts the online CPUs (`nproc --all`); `nproc` counts those
    # this process may use (1 under taskset -c 0): where the two differ,
    # either count is nginx's to pick, and a refusal names it
    my ($all, $usable) = (`nproc --all` + 0, `nproc` + 0);
    if ($all > 1 && $usable > 1) {
        isnt($rc, 0, 'worker_processes auto (>1 CPU): refused') or diag $out;
    } elsif ($all <= 1 && $usable <= 1) {
        is($rc, 0, 'worker_processes auto (1 CPU): accepted') or diag $out;
    } else {
        my ($n) = $out =~ /(\d+) configured/;
        ok($rc == 0 || (defined $n && $n > 1),
           "worker_processes auto ($usable of $all CPUs usable): accepted, "
           . 'or refused naming the count') or diag $out;
    }
}

# moe_engine naming a missing file
{
    my $s = prepare_server();
    my $conf = slurp($s->dir . '/nginx.conf');
    $conf =~ s{moe_engine \S+;}{moe_engine /nonexistent/engine.yaml;};
    open my $fh, '>', $s->dir . '/nginx.conf' or die;
    print $fh $conf;
    close $fh;
    my ($rc, $out) = nginx_test($s);
    isnt($rc, 0, 'missing YAML file: nginx -t fails') or diag $out;
    like($out, qr{/nonexistent/engine\.yaml}, 'missing YAML file: named')
        or diag $out;
}

done_testing();
