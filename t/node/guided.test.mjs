// Structured output through the official OpenAI Node SDK against LocalMoE:
// response_format json_schema with chat.completions.create (content parses
// and validates against the schema, greedy and sampled, streamed too) and
// with the SDK's parse helper (beta.chat.completions.parse: message.parsed
// is the object), json_object, and a schema that does not compile
// surfacing as BadRequestError naming response_format.  Prints TAP.
// Env: BASE_URL, NODE_PATH (see t/http_guided.t).
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

const client = new OpenAI({
  baseURL: process.env.BASE_URL, apiKey: 'sk-localmoe-test', maxRetries: 0,
  timeout: 120_000,
});
const model = (await client.models.list()).data[0].id;
const messages = [{ role: 'user', content: 'Give me a city as JSON.' }];
const schema = {
  type: 'object',
  properties: {
    city: { type: 'string', maxLength: 16 },
    population: { type: 'integer' },
    coastal: { type: 'boolean' },
    districts: { type: 'array', items: { type: 'string', maxLength: 8 },
                 maxItems: 2 },
  },
  required: ['city', 'population', 'coastal', 'districts'],
  additionalProperties: false,
};
const format = { type: 'json_schema',
                 json_schema: { name: 'city', schema, strict: true } };

function check(o) {
  if (o === null || typeof o !== 'object' || Array.isArray(o)) return 'not an object';
  const keys = Object.keys(o).sort().join(',');
  if (keys !== 'city,coastal,districts,population') return `keys ${keys}`;
  if (typeof o.city !== 'string' || [...o.city].length > 16) return 'city';
  if (!Number.isInteger(o.population)) return 'population';
  if (typeof o.coastal !== 'boolean') return 'coastal';
  if (!Array.isArray(o.districts) || o.districts.length > 2
      || o.districts.some((d) => typeof d !== 'string')) return 'districts';
  return '';
}

for (const temperature of [0, 1]) {
  await step(`create json_schema t=${temperature}`, async () => {
    const r = await client.chat.completions.create({
      model, messages, temperature, seed: 4, max_tokens: 180,
      response_format: format,
    });
    const content = r.choices[0].message.content;
    let o = null;
    try { o = JSON.parse(content); } catch (e) { /* reported below */ }
    ok(check(o) === '', `create json_schema (temperature ${temperature}): `
       + 'content parses and validates', content);
    ok(r.choices[0].finish_reason === 'stop', 'finish_reason stop',
       r.choices[0].finish_reason);
  });
}

await step('parse helper', async () => {
  const r = await client.beta.chat.completions.parse({
    model, messages, temperature: 0, max_tokens: 180, response_format: format,
  });
  const m = r.choices[0].message;
  ok(check(m.parsed) === '', 'beta.chat.completions.parse: message.parsed '
     + 'validates', m.content);
});

await step('streamed json_schema', async () => {
  const stream = await client.chat.completions.create({
    model, messages, temperature: 0.7, seed: 9, max_tokens: 180,
    response_format: format, stream: true,
  });
  let text = '';
  for await (const chunk of stream) text += chunk.choices?.[0]?.delta?.content ?? '';
  let o = null;
  try { o = JSON.parse(text); } catch (e) { /* reported below */ }
  ok(check(o) === '', 'streamed json_schema: the deltas parse and validate', text);
});

await step('json_object', async () => {
  const r = await client.chat.completions.create({
    model, messages, temperature: 0, max_tokens: 200,
    response_format: { type: 'json_object' },
  });
  const c = r.choices[0].message.content;
  if (r.choices[0].finish_reason === 'stop') {
    let o = null;
    try { o = JSON.parse(c); } catch (e) { /* reported below */ }
    ok(o !== null && typeof o === 'object' && !Array.isArray(o),
       'json_object: content is a JSON object', c);
  } else {
    ok(c.startsWith('{'), 'json_object: cut at length, an object\'s start', c);
  }
});

await step('bad schema', async () => {
  try {
    await client.chat.completions.create({
      model, messages, max_tokens: 5,
      response_format: { type: 'json_schema', json_schema: {
        name: 'x', schema: { type: 'string', not: {} } } },
    });
    ok(false, 'unsupported schema keyword: refused');
  } catch (e) {
    ok(e instanceof OpenAI.BadRequestError && e.status === 400
       && /unsupported keyword 'not'/.test(e.message)
       && e.param === 'response_format',
       'unsupported schema keyword: BadRequestError 400, param '
       + 'response_format, names the keyword', `${e?.status} ${e?.message}`);
  }
});

console.log(`1..${n}`);
process.exit(failed ? 1 : 0);
