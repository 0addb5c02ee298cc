// The official OpenAI Node SDK against LocalMoE: model list, streamed chat
// (for await over chunks), non-stream chat, completions (plain and
// streamed, with include_usage), logprobs (chat top_logprobs streamed and
// not, completions logprobs with echo), n = 2, logit_bias (-100 on the
// greedy token changes it, +100 forces it), and errors surfacing as the
// SDK's typed errors (NotFoundError 404 for an unknown model,
// BadRequestError 400).
// Prints TAP.  Env: BASE_URL (http://127.0.0.1:PORT/v1), NODE_PATH with the
// SDK's node_modules (installed by t/http_openai_sdk.t into build/npm-sdk).
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const sdk = require('openai');            // resolved through NODE_PATH
const OpenAI = sdk.OpenAI ?? sdk.default ?? sdk;

let n = 0;
let failed = 0;
function ok(cond, what, diag) {
  n++;
  if (!cond) failed++;
  console.log(`${cond ? 'ok' : 'not ok'} ${n} - ${what}`);
  if (!cond && diag !== undefined) {
    for (const l of String(typeof diag === 'string' ? diag : JSON.stringify(diag))
      .split('\n')) console.log(`# ${l}`);
  }
}
async function step(what, fn) {
  try {
    await fn();
  } catch (e) {
    ok(false, `${what}: threw`, `${e?.constructor?.name}: ${e?.message}`);
  }
}

const client = new OpenAI({
  baseURL: process.env.BASE_URL,
  apiKey: 'sk-localmoe-test',
  maxRetries: 0,
  timeout: 60_000,
});
let model = 'unknown';
const messages = [{ role: 'user', content: 'Say something about nginx.' }];

await step('models.list', async () => {
  const list = await client.models.list();
  const data = list.data ?? [];
  ok(data.length >= 1 && typeof data[0].id === 'string', 'models.list has a model');
  model = data[0]?.id ?? model;
});

let streamed = '';
await step('streamed chat', async () => {
  const stream = await client.chat.completions.create({
    model, messages, max_tokens: 12, temperature: 0, stream: true,
  });
  let chunks = 0;
  let finish = null;
  let role = null;
  for await (const chunk of stream) {
    chunks++;
    const c = chunk.choices?.[0];
    if (c?.delta?.role) role = c.delta.role;
    if (c?.delta?.content) streamed += c.delta.content;
    if (c?.finish_reason) finish = c.finish_reason;
    if (chunk.object !== 'chat.completion.chunk') {
      ok(false, 'chunk object is chat.completion.chunk', chunk);
    }
  }
  ok(chunks >= 2, `streamed chat: ${chunks} chunks (>= 2)`);
  ok(role === 'assistant', 'streamed chat: role assistant');
  ok(finish === 'length' || finish === 'stop', `streamed chat: finish_reason ${finish}`);
});

await step('chat', async () => {
  const r = await client.chat.completions.create({
    model, messages, max_tokens: 12, temperature: 0,
  });
  ok(r.object === 'chat.completion', 'chat: object chat.completion');
  ok(r.choices[0].message.role === 'assistant', 'chat: assistant message');
  ok(r.choices[0].message.content === streamed,
    'chat: same text as the stream (greedy)',
    { stream: streamed, plain: r.choices[0].message.content });
  ok(r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens,
    'chat: usage adds up', r.usage);
});

await step('completion', async () => {
  const r = await client.completions.create({
    model, prompt: 'Hello, my name is', max_tokens: 5, temperature: 0,
  });
  ok(r.object === 'text_completion', 'completion: object text_completion');
  ok(typeof r.choices[0].text === 'string', 'completion: text is a string');
  ok(r.choices[0].finish_reason === 'length' || r.choices[0].finish_reason === 'stop',
    'completion: finish_reason');
  ok(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 5,
    'completion: completion_tokens in 1..5', r.usage);

  const s = await client.completions.create({
    model, prompt: 'Hello, my name is', max_tokens: 5, temperature: 0,
    stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let usage = null;
  for await (const chunk of s) {
    for (const c of chunk.choices ?? []) text += c.text ?? '';
    if (chunk.usage) usage = chunk.usage;
  }
  ok(text === r.choices[0].text, 'streamed completion: same text',
    { stream: text, plain: r.choices[0].text });
  ok(usage && usage.completion_tokens === r.usage.completion_tokens,
    'streamed completion: include_usage', usage);
});

// ---- logprobs and n (issue 10 items 4 and 5) ----
await step('logprobs', async () => {
  const r = await client.chat.completions.create({
    model, messages, max_tokens: 6, temperature: 0, logprobs: true,
    top_logprobs: 4,
  });
  const content = r.choices[0].logprobs?.content ?? [];
  ok(content.length === 6, `chat logprobs: ${content.length} entries (6)`);
  let good = content.length > 0;
  for (const e of content) {
    const top = e.top_logprobs ?? [];
    const mass = top.reduce((a, t) => a + Math.exp(t.logprob), 0);
    good &&= typeof e.token === 'string' && e.logprob <= 0
      && Array.isArray(e.bytes) && top.length === 4 && mass <= 1 + 1e-5
      && top.every((t, i) => i === 0 || t.logprob <= top[i - 1].logprob);
  }
  ok(good, 'chat logprobs: token, logprob <= 0, bytes, 4 sorted top entries '
    + 'whose exp sums to <= 1', content[0]);
  ok(content.map((e) => e.token).join('') === r.choices[0].message.content,
    'chat logprobs: tokens spell the content');

  const s = await client.chat.completions.create({
    model, messages, max_tokens: 6, temperature: 0, logprobs: true,
    top_logprobs: 2, stream: true,
  });
  const streamedLp = [];
  for await (const chunk of s) {
    for (const e of chunk.choices?.[0]?.logprobs?.content ?? []) streamedLp.push(e);
  }
  ok(streamedLp.length === 6 && streamedLp.every((e) => e.top_logprobs.length === 2),
    `streamed chat logprobs: 6 entries with 2 top each (${streamedLp.length})`);

  const c = await client.completions.create({
    model, prompt: 'Hello, my name is', max_tokens: 4, temperature: 0,
    logprobs: 3, echo: true,
  });
  const lp = c.choices[0].logprobs;
  ok(lp && lp.tokens.length === lp.token_logprobs.length
    && lp.tokens.length === lp.top_logprobs.length
    && lp.tokens.length === lp.text_offset.length
    && lp.token_logprobs[0] === null && lp.tokens.length === c.usage.prompt_tokens + 4,
    'completion logprobs + echo: parallel lists over prompt and completion, '
    + 'first logprob null', lp);
  ok(c.choices[0].text.startsWith('Hello, my name is'), 'echo: the prompt first');
});

await step('n', async () => {
  const r = await client.chat.completions.create({
    model, messages, max_tokens: 5, temperature: 0, n: 2,
  });
  ok(r.choices.length === 2 && r.choices[0].index === 0 && r.choices[1].index === 1,
    'n=2: two choices with index 0 and 1', r.choices);
  ok(r.choices[0].message.content === r.choices[1].message.content,
    'n=2 greedy: equal contents');
  const s = await client.chat.completions.create({
    model, messages, max_tokens: 5, temperature: 0, n: 2, stream: true,
  });
  const texts = ['', ''];
  for await (const chunk of s) {
    for (const c of chunk.choices ?? []) texts[c.index] += c.delta?.content ?? '';
  }
  ok(texts[0] === r.choices[0].message.content && texts[1] === texts[0],
    'streamed n=2: both indexes carry the text', texts);
});

await step('logit_bias', async () => {
  // the greedy first token of a prompt, its id from /tokenize (a prompt
  // whose first token is one id by itself), then -100 on that id
  const root = process.env.BASE_URL.replace(/\/v1$/, '');
  let id = null, first = null, prompt = null;
  for (const p of ['Hello, my name is', 'In the beginning', 'The quick brown fox',
    'Once upon a time']) {
    const r = await client.completions.create({ model, prompt: p, max_tokens: 1,
      temperature: 0 });
    const t = r.choices[0].text;
    const tk = await fetch(`${root}/tokenize`, {
      method: 'POST', headers: { 'Content-Type': 'application/json',
        Authorization: 'Bearer sk-localmoe-test' },
      body: JSON.stringify({ model, prompt: t, add_special_tokens: false }),
    }).then((x) => x.json());
    if (t.length > 0 && tk.tokens?.length === 1) {
      id = tk.tokens[0]; first = t; prompt = p;
      break;
    }
  }
  ok(id !== null, 'a greedy first token that is one id', { id, first });
  const b = await client.completions.create({ model, prompt, max_tokens: 1,
    temperature: 0, logit_bias: { [id]: -100 } });
  ok(b.choices[0].text !== first,
    `logit_bias -100 on the greedy token (${JSON.stringify(first)}, id ${id}) changes it`,
    b.choices[0].text);
  const f = await client.completions.create({ model, prompt, max_tokens: 3,
    temperature: 0.9, seed: 7, logit_bias: { [id]: 100 } });
  ok(f.choices[0].text.startsWith(first),
    'logit_bias +100 forces that token, sampled too', f.choices[0].text);
});

await step('errors', async () => {
  let err = null;
  try {
    await client.chat.completions.create({
      model: 'no-such-model', messages, max_tokens: 2,
    });
  } catch (e) {
    err = e;
  }
  ok(err instanceof OpenAI.APIError, 'unknown model: an APIError',
    `${err?.constructor?.name}: ${err?.message}`);
  ok(err instanceof OpenAI.NotFoundError, 'unknown model: NotFoundError');
  ok(err?.status === 404, `unknown model: status ${err?.status}`);
  ok(err?.code === 'model_not_found', `unknown model: code ${err?.code}`);
  ok(typeof err?.error?.message === 'string' && err.error.message.length > 0,
    'unknown model: error.message', err?.error);

  let bad = null;
  try {
    await client.completions.create({ model, prompt: 'x', max_tokens: 2,
      temperature: 5 });
  } catch (e) {
    bad = e;
  }
  ok(bad instanceof OpenAI.BadRequestError && bad.status === 400,
    'temperature 5: BadRequestError 400', `${bad?.constructor?.name} ${bad?.status}`);

  let sbad = null;
  try {
    const st = await client.chat.completions.create({
      model: 'no-such-model', messages, max_tokens: 2, stream: true,
    });
    for await (const _ of st) { /* drain */ }
  } catch (e) {
    sbad = e;
  }
  ok(sbad instanceof OpenAI.NotFoundError, 'streamed unknown model: NotFoundError',
    `${sbad?.constructor?.name}: ${sbad?.message}`);
});

console.log(`1..${n}`);
process.exit(failed ? 1 : 0);
