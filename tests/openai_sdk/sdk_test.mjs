// tests/openai_sdk/sdk_test.mjs - kdkit serve as the official OpenAI Node SDK
// (npm package `openai`, pinned in package.json / package-lock.json) sees it:
// chat, completions (a list of prompts), embeddings in both encodings (the
// SDK asks for base64 by default and decodes it), streaming with usage,
// models list and retrieve, logprobs, errors mapped to the SDK's classes, the
// bearer key, x-request-id.  Run by tests/openai_sdk.cmake through node's
// built-in test runner: KDKIT=path/to/kdkit node --test sdk_test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI, {
  AuthenticationError, BadRequestError, NotFoundError, RateLimitError, APIConnectionError,
} from 'openai';

const KDKIT = process.env.KDKIT;
const KEY = 'sk-kdkit-sdk-test-key';
const dir = mkdtempSync(join(tmpdir(), 'kd_sdk_'));
const servers = [];

async function serve(name, extra = []) {
  const portFile = join(dir, `${name}.port`);
  const child = spawn(KDKIT, ['serve', '--toy', '--port', '0', '--port-file', portFile,
    '--api-key-env', 'KD_SDK_KEY', ...extra],
  { env: { ...process.env, KD_SDK_KEY: KEY }, stdio: ['ignore', 'ignore', 'inherit'] });
  servers.push(child);
  for (let i = 0; i < 200 && !existsSync(portFile); i++)
    await new Promise((r) => setTimeout(r, 50));
  const port = Number(readFileSync(portFile, 'utf8').trim());
  assert.ok(port > 0, 'kdkit serve wrote its port');
  return `http://127.0.0.1:${port}/v1`;
}

let base;
let client;
const MODEL = 'kdkit-toy';
const chatMsgs = [{ role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'What is distillation?' }];

before(async () => {
  assert.ok(KDKIT, 'KDKIT names the kdkit binary');
  base = await serve('main');
  client = new OpenAI({ baseURL: base, apiKey: KEY, maxRetries: 0 });
});

after(() => {
  for (const s of servers) s.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

test('models: list and retrieve', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids, [MODEL]);
  const m = await client.models.retrieve(MODEL);
  assert.equal(m.id, MODEL);
  assert.equal(m.object, 'model');
  await assert.rejects(client.models.retrieve('gpt-4o'), NotFoundError);
});

test('chat completion with logprobs, refusal, fingerprint, request id', async () => {
  const { data: r, response } = await client.chat.completions.create({
    model: MODEL, messages: chatMsgs, max_tokens: 12, seed: 7, logprobs: true, top_logprobs: 3,
  }).withResponse();
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-kdkit-/);
  assert.equal(typeof r.system_fingerprint, 'string');
  assert.match(response.headers.get('x-request-id'), /^req_/);
  assert.equal(r._request_id, response.headers.get('x-request-id'));
  const c0 = r.choices[0];
  assert.equal(c0.message.role, 'assistant');
  assert.equal(typeof c0.message.content, 'string');
  assert.equal(c0.message.refusal, null);
  assert.equal(c0.logprobs.refusal, null);
  assert.equal(c0.logprobs.content.length, r.usage.completion_tokens);
  assert.equal(c0.logprobs.content.map((t) => t.token).join(''), c0.message.content);
  for (const t of c0.logprobs.content) {
    assert.equal(t.top_logprobs.length, 3);
    assert.ok(t.logprob <= 0);
    assert.deepEqual(t.bytes, [...Buffer.from(t.token, 'utf8')]);
  }
  assert.ok(['stop', 'length'].includes(c0.finish_reason));
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
});

test('completions: a list of prompts, legacy logprobs with the sampled token', async () => {
  const r = await client.completions.create({
    model: MODEL, prompt: ['alpha', 'beta'], max_tokens: 6, n: 2, logprobs: 2, seed: 3,
  });
  assert.equal(r.object, 'text_completion');
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2, 3]);
  for (const c of r.choices) {
    const lp = c.logprobs;
    assert.equal(lp.tokens.join(''), c.text);
    lp.tokens.forEach((tok, i) => {
      assert.ok(tok in lp.top_logprobs[i], 'the sampled token is among its top_logprobs');
      assert.equal(lp.top_logprobs[i][tok], lp.token_logprobs[i]);
    });
  }
});

test('embeddings: default (base64, decoded by the SDK), float and base64 agree', async () => {
  const input = ['distil me', 'and me'];
  const dflt = await client.embeddings.create({ model: MODEL, input });
  const flt = await client.embeddings.create({ model: MODEL, input, encoding_format: 'float' });
  const b64 = await client.embeddings.create({ model: MODEL, input, encoding_format: 'base64' });
  assert.equal(dflt.data.length, 2);
  for (let i = 0; i < 2; i++) {
    const a = dflt.data[i].embedding;
    const f = flt.data[i].embedding;
    assert.ok(Array.isArray(a) && a.length === f.length && a.length > 0);
    const raw = Buffer.from(b64.data[i].embedding, 'base64');
    assert.equal(raw.length, 4 * f.length);
    for (let k = 0; k < f.length; k++) {
      assert.ok(Number.isFinite(a[k]) && Math.abs(a[k]) < 1e3, 'not floats decoded as base64');
      assert.ok(Math.abs(a[k] - f[k]) < 1e-6);
      assert.ok(Math.abs(raw.readFloatLE(4 * k) - f[k]) < 1e-6);
    }
  }
  await assert.rejects(
    client.embeddings.create({ model: MODEL, input: 'x', encoding_format: 'int8' }),
    (e) => e instanceof BadRequestError && e.param === 'encoding_format',
  );
});

test('streaming chat: chunks add up to the answer, usage last', async () => {
  const req = { model: MODEL, messages: chatMsgs, max_tokens: 10, seed: 11, logprobs: true,
    top_logprobs: 2 };
  const whole = await client.chat.completions.create(req);
  const stream = await client.chat.completions.create({
    ...req, stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let tokens = 0;
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const ch of chunk.choices) {
      text += ch.delta.content ?? '';
      tokens += ch.logprobs?.content?.length ?? 0;
      finish = ch.finish_reason ?? finish;
    }
  }
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(tokens, whole.usage.completion_tokens);
  assert.equal(finish, whole.choices[0].finish_reason);
  assert.deepEqual(usage, whole.usage);
  // The SDK's helper assembles the same message.
  const runner = client.chat.completions.stream({ ...req });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, whole.choices[0].message.content);
});

test('streaming completions', async () => {
  const req = { model: MODEL, prompt: 'Once', max_tokens: 8, seed: 2 };
  const whole = await client.completions.create(req);
  const stream = await client.completions.create({ ...req, stream: true });
  let text = '';
  for await (const chunk of stream) for (const ch of chunk.choices) text += ch.text;
  assert.equal(text, whole.choices[0].text);
});

test('errors map to the SDK classes', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: 'gpt-4o', messages: chatMsgs }), NotFoundError);
  await assert.rejects(
    client.chat.completions.create({
      model: MODEL, messages: chatMsgs,
      tools: [{ type: 'function', function: { name: 'f', parameters: {} } }],
    }),
    (e) => e instanceof BadRequestError && e.status === 400 && e.param === 'tools',
  );
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: chatMsgs, temperature: 3 }),
    (e) => e instanceof BadRequestError && e.param === 'temperature',
  );
  const wrong = new OpenAI({ baseURL: base, apiKey: 'sk-wrong', maxRetries: 0 });
  await assert.rejects(wrong.models.list(), AuthenticationError);
  const limited = new OpenAI({
    baseURL: await serve('limited', ['--fault-script', '429*3', '--retry-after', '0']),
    apiKey: KEY, maxRetries: 0,
  });
  await assert.rejects(
    limited.completions.create({ model: MODEL, prompt: 'x', max_tokens: 1 }), RateLimitError);
  const closed = new OpenAI({ baseURL: 'http://127.0.0.1:1/v1', apiKey: KEY, maxRetries: 0 });
  await assert.rejects(closed.models.list(), APIConnectionError);
});

test('the SDK retries a 429 and then succeeds', async () => {
  const flaky = new OpenAI({
    baseURL: await serve('flaky', ['--fault-script', '429', '--retry-after', '0']),
    apiKey: KEY, maxRetries: 2,
  });
  const r = await flaky.completions.create({ model: MODEL, prompt: 'x', max_tokens: 2 });
  assert.equal(r.choices.length, 1);
});
