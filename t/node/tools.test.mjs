// Tool calling through the official OpenAI Node SDK, on the embedded model:
// tool_choice "required" and a named function (the guided decoder makes
// the output a call whatever the model's skill): finish_reason tool_calls,
// arguments that JSON.parse and validate against the function's schema;
// the streamed deltas reassemble to the same call; the answer goes back as
// an assistant message with tool_calls plus a role "tool" message with
// tool_call_id, and the server renders it and answers; the legacy
// functions / function_call; a wrong tools type is the SDK's
// BadRequestError naming the field.  Prints TAP.  Env: BASE_URL,
// NODE_PATH (see t/http_openai_sdk_tools.t).
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const sdk = require('openai');
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

// '' when v is valid under the JSON Schema subset of the tools below
function validate(v, s) {
  if (s.type === 'object') {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return 'not an object';
    for (const r of s.required ?? []) if (!(r in v)) return `missing ${r}`;
    for (const k of Object.keys(v)) {
      if (!s.properties?.[k]) return `extra key ${k}`;
      const e = validate(v[k], s.properties[k]);
      if (e) return `${k}: ${e}`;
    }
    return '';
  }
  if (s.type === 'string') {
    if (typeof v !== 'string') return 'not a string';
    if (s.enum && !s.enum.includes(v)) return 'not in the enum';
    return '';
  }
  if (s.type === 'integer') {
    if (!Number.isInteger(v)) return 'not an integer';
    return s.enum && !s.enum.includes(v) ? 'not in the enum' : '';
  }
  return '';
}

const client = new OpenAI({
  baseURL: process.env.BASE_URL, apiKey: 'sk-localmoe-test', maxRetries: 0,
  timeout: 120_000,
});
const model = (await client.models.list()).data[0].id;

const weather = {
  type: 'function',
  function: {
    name: 'get_weather', description: 'Current weather in a city',
    parameters: {
      type: 'object',
      // enums keep a random tiny model's output short; the shape is the test
      properties: {
        city: { type: 'string', enum: ['Paris', 'Rome'] },
        days: { type: 'integer', enum: [1, 2, 3] },
      },
      required: ['city', 'days'], additionalProperties: false,
    },
  },
};
const clock = {
  type: 'function',
  function: {
    name: 'get_time',
    parameters: {
      type: 'object', properties: { zone: { type: 'string', enum: ['utc', 'cet'] } },
      required: ['zone'], additionalProperties: false,
    },
  },
};
const tools = [weather, clock];
const byName = Object.fromEntries(tools.map((t) => [t.function.name, t.function]));
const messages = [{ role: 'user', content: 'What is the weather in Paris?' }];
const base = { model, messages, tools, temperature: 0, max_tokens: 120 };

function checkCalls(what, r, wantName) {
  const c = r.choices[0];
  ok(c.finish_reason === 'tool_calls', `${what}: finish_reason tool_calls`,
    c.finish_reason);
  const calls = c.message.tool_calls ?? [];
  ok(calls.length >= 1, `${what}: ${calls.length} call(s)`, c.message);
  for (const tc of calls) {
    ok(/^call_[A-Za-z0-9]{24}$/.test(tc.id) && tc.type === 'function',
      `${what}: id ${tc.id}, type function`);
    const fn = byName[tc.function.name];
    ok(fn && (!wantName || tc.function.name === wantName),
      `${what}: calls ${tc.function.name}`);
    let args = null;
    try { args = JSON.parse(tc.function.arguments); } catch { /* below */ }
    ok(args !== null, `${what}: arguments parse`, tc.function.arguments);
    ok(fn && args !== null && validate(args, fn.parameters) === '',
      `${what}: arguments validate against the schema`,
      fn && args !== null ? validate(args, fn.parameters) : tc.function.arguments);
  }
  return calls;
}

let first = null;
await step('required', async () => {
  const r = await client.chat.completions.create({ ...base, tool_choice: 'required',
    parallel_tool_calls: false });
  checkCalls('required', r);
  first = r.choices[0].message;
});

let named = null;
await step('named', async () => {
  const r = await client.chat.completions.create({ ...base,
    tool_choice: { type: 'function', function: { name: 'get_weather' } } });
  checkCalls('named', r, 'get_weather');
  named = r.choices[0].message.tool_calls;
});

await step('named, streamed', async () => {
  const stream = await client.chat.completions.create({ ...base, stream: true,
    tool_choice: { type: 'function', function: { name: 'get_weather' } } });
  const calls = [];
  let finish = null;
  let shape = true;
  for await (const chunk of stream) {
    const c = chunk.choices?.[0];
    if (c?.finish_reason) finish = c.finish_reason;
    for (const d of c?.delta?.tool_calls ?? []) {
      if (!calls[d.index]) {
        shape &&= typeof d.id === 'string' && d.type === 'function'
          && typeof d.function?.name === 'string' && d.function?.arguments === '';
        calls[d.index] = { name: d.function.name, arguments: '' };
      } else {
        shape &&= d.function?.name === undefined;
        calls[d.index].arguments += d.function?.arguments ?? '';
      }
    }
  }
  ok(shape, 'named, streamed: first delta id/type/name/arguments "", then fragments');
  ok(finish === 'tool_calls', `named, streamed: finish_reason ${finish}`);
  ok(JSON.stringify(calls)
     === JSON.stringify((named ?? []).map((t) => ({ name: t.function.name,
       arguments: t.function.arguments }))),
  'named, streamed: deltas reassemble to the non-streamed call',
  { streamed: calls, plain: named });
});

await step('tool result round trip', async () => {
  // the SDK's own assistant message from the required call
  ok(first !== null, 'tool result: the required call came back');
  const asst = first;
  const convo = [...messages, asst, ...asst.tool_calls.map((tc) => ({
    role: 'tool', tool_call_id: tc.id, content: '{"temperature_c": 22}' }))];
  const r = await client.chat.completions.create({ model, messages: convo,
    tools, temperature: 0, max_tokens: 16 });
  const c = r.choices[0];
  ok(c.message.role === 'assistant'
     && ['stop', 'length', 'tool_calls'].includes(c.finish_reason),
  `tool result: rendered and answered (${c.finish_reason})`);
  ok(r.usage.prompt_tokens > 20, `tool result: prompt has ${r.usage.prompt_tokens} tokens`);
});

await step('legacy functions', async () => {
  const r = await client.chat.completions.create({ model, messages,
    temperature: 0, max_tokens: 120, functions: [weather.function],
    function_call: { name: 'get_weather' } });
  const c = r.choices[0];
  ok(c.finish_reason === 'function_call' && c.message.function_call?.name === 'get_weather',
    'legacy: message.function_call, finish_reason function_call', c);
  let args = null;
  try { args = JSON.parse(c.message.function_call?.arguments); } catch { /* below */ }
  ok(args !== null && validate(args, weather.function.parameters) === '',
    'legacy: arguments validate', c.message.function_call);
});

await step('wrong tools type', async () => {
  let err = null;
  try {
    await client.chat.completions.create({ model, messages, tools: 'x' });
  } catch (e) { err = e; }
  ok(err instanceof OpenAI.BadRequestError && err.status === 400
     && err.param === 'tools', `tools "x": BadRequestError, param ${err?.param}`);
  err = null;
  try {
    await client.chat.completions.create({ model, messages, tools,
      tool_choice: { type: 'function', function: { name: 'nope' } } });
  } catch (e) { err = e; }
  ok(err instanceof OpenAI.BadRequestError && err.param === 'tool_choice',
    `unknown function: BadRequestError, param ${err?.param}`);
});

console.log(`1..${n}`);
process.exit(failed ? 1 : 0);
