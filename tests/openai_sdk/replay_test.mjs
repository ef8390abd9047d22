// tests/openai_sdk/replay_test.mjs - the official OpenAI Node SDK and
// `kdkit teacher ask` against the same recorded-response server: for each
// case the SDK sends its request and reads a recorded OpenAI response, then
// kdkit sends the same logical request and gets the same bytes.  The request
// kdkit sends must have the SDK's shape (path, headers, the same values for
// the same fields, only OpenAI's defaults besides), and kdkit must read the
// answer as the SDK does: text, refusal, logprobs, a \u0000, missing usage,
// an error message with escape sequences (shown escaped).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI, { BadRequestError } from 'openai';

const KDKIT = process.env.KDKIT;
const KEY = 'sk-kdkit-replay-key-0123456789';
const dir = mkdtempSync(join(tmpdir(), 'kd_replay_'));
let server;
let base;
let queue = [];      // recorded responses still to send
const seen = [];     // requests received

before(async () => {
  server = createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      seen.push({ method: req.method, url: req.url, headers: req.headers, body: JSON.parse(body) });
      const r = queue.shift() ?? { status: 500, body: '{"error":{"message":"no recording"}}' };
      res.writeHead(r.status, { 'content-type': 'application/json', 'x-request-id': 'req_rec' });
      res.end(r.body);
    });
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  base = `http://127.0.0.1:${server.address().port}/v1`;
});

after(() => {
  server.close();
  rmSync(dir, { recursive: true, force: true });
});

let caseNo = 0;
// kdkit teacher ask with a config for this case; resolves {status, out, err}.
function kdkitAsk(endpoint, defaults, args) {
  const n = ++caseNo;
  const cfg = join(dir, `c${n}.yaml`);
  const lines = Object.entries(defaults).map(([k, v]) => `    ${k}: ${JSON.stringify(v)}`);
  writeFileSync(cfg, `teacher:\n  base_url: ${base}\n  model: gpt-4o-mini\n  endpoint: ${endpoint}\n`
    + `  api_key_env: KD_REPLAY_KEY\n  retry:\n    max_attempts: 1\n`
    + `  cache:\n    path: ${join(dir, `c${n}.sqlite`)}\n  defaults:\n${lines.join('\n')}\n`);
  return new Promise((ok) => {
    const p = spawn(KDKIT, ['teacher', 'ask', '--config', cfg, '--output-dir', join(dir, `r${n}`),
      ...args], { env: { ...process.env, KD_REPLAY_KEY: KEY } });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { err += d; });
    p.on('close', (status) => ok({ status, out, err }));
  });
}

const sdk = () => new OpenAI({ baseURL: base, apiKey: KEY, maxRetries: 0 });

// The fields kdkit adds beyond what the SDK was given: OpenAI's defaults.
const DEFAULTS = { top_p: 1, n: 1, presence_penalty: 0, frequency_penalty: 0, temperature: 1,
  logprobs: false };

function sameShape(sdkReq, kdReq) {
  assert.equal(kdReq.method, 'POST');
  assert.equal(kdReq.url, sdkReq.url);
  assert.equal(kdReq.headers['content-type'], 'application/json');
  assert.equal(kdReq.headers.authorization, sdkReq.headers.authorization);
  for (const [k, v] of Object.entries(sdkReq.body)) assert.deepEqual(kdReq.body[k], v, k);
  for (const [k, v] of Object.entries(kdReq.body)) {
    if (k in sdkReq.body) continue;
    assert.ok(k in DEFAULTS, `kdkit sent ${k}, which the SDK request did not have`);
    assert.deepEqual(v, DEFAULTS[k], k);
  }
}

const chatAnswer = (message, extra = {}) => JSON.stringify({
  id: 'chatcmpl-rec', object: 'chat.completion', created: 1, model: 'gpt-4o-mini-2024-07-18',
  system_fingerprint: 'fp_rec', choices: [{ index: 0, message, logprobs: null,
    finish_reason: 'stop', ...extra }],
  usage: { prompt_tokens: 21, completion_tokens: 3, total_tokens: 24 },
});

const system = 'You are terse.';
const prompt = 'What is distillation?';
const messages = [{ role: 'system', content: system }, { role: 'user', content: prompt }];

test('chat with logprobs: same request, same reading', async () => {
  const lp = { content: [
    { token: 'Te', bytes: [84, 101], logprob: -0.25,
      top_logprobs: [{ token: 'Te', bytes: [84, 101], logprob: -0.25 },
        { token: 'A', bytes: [65], logprob: -1.5 }] },
    { token: 'ach', bytes: [97, 99, 104], logprob: -0.5,
      top_logprobs: [{ token: 'ach', bytes: [97, 99, 104], logprob: -0.5 }] }],
  refusal: null };
  const rec = chatAnswer({ role: 'assistant', content: 'Teach', refusal: null }, { logprobs: lp });
  queue = [{ status: 200, body: rec }, { status: 200, body: rec }];
  const r = await sdk().chat.completions.create({ model: 'gpt-4o-mini', messages, max_tokens: 16,
    temperature: 0.5, logprobs: true, top_logprobs: 2 });
  const k = await kdkitAsk('chat', { max_tokens: 16, temperature: 0.5, logprobs: true,
    top_logprobs: 2 }, ['--system', system, '--logprobs', prompt]);
  assert.equal(k.status, 0, k.err);
  sameShape(seen.at(-2), seen.at(-1));
  assert.match(k.out, new RegExp(`^response: ${r.choices[0].message.content}$`, 'm'));
  assert.match(k.out, /^usage: 21 prompt tokens, 3 completion tokens$/m);
  const kdTokens = k.out.split('\n').filter((l) => l.startsWith('  ')).map((l) => l.trim().split(/\s+/)[0]);
  assert.deepEqual(kdTokens, r.choices[0].logprobs.content.map((t) => t.token));
});

test('a refusal is read as one by both', async () => {
  const rec = chatAnswer({ role: 'assistant', content: null, refusal: "I can't help with that." });
  queue = [{ status: 200, body: rec }, { status: 200, body: rec }];
  const r = await sdk().chat.completions.create({ model: 'gpt-4o-mini', messages, max_tokens: 8 });
  assert.equal(r.choices[0].message.content, null);
  const k = await kdkitAsk('chat', { max_tokens: 8, logprobs: false, top_logprobs: 0 },
    ['--system', system, prompt]);
  assert.equal(k.status, 0, k.err);
  sameShape(seen.at(-2), seen.at(-1));
  assert.equal(seen.at(-1).body.top_logprobs, undefined, 'no top_logprobs without logprobs');
  assert.match(k.out, new RegExp(`^refusal: ${r.choices[0].message.refusal}$`, 'm'));
  assert.match(k.out, /cache: miss.*1 attempt\)/);
});

test('\\u0000 in the answer and no usage', async () => {
  const rec = '{"id":"chatcmpl-nul","object":"chat.completion","model":"m","choices":[{"index":0,'
    + '"message":{"role":"assistant","content":"a\\u0000b"},"finish_reason":"stop"}]}';
  queue = [{ status: 200, body: rec }, { status: 200, body: rec }];
  const r = await sdk().chat.completions.create({ model: 'gpt-4o-mini', messages, max_tokens: 8 });
  assert.equal(r.choices[0].message.content, 'a\u0000b');
  const k = await kdkitAsk('chat', { max_tokens: 8, logprobs: false, top_logprobs: 0 },
    ['--system', system, prompt]);
  assert.equal(k.status, 0, k.err);
  assert.match(k.out, /^response: a\\x00b$/m);
  assert.match(k.out, /^usage: unknown prompt tokens, unknown completion tokens$/m);
  assert.match(k.out, /worst case/);
});

test('completions with legacy logprobs', async () => {
  const rec = JSON.stringify({ id: 'cmpl-rec', object: 'text_completion', created: 1, model: 'm',
    choices: [{ index: 0, text: ' yes', finish_reason: 'length', logprobs: {
      tokens: [' y', 'es'], token_logprobs: [-0.1, -0.2], text_offset: [0, 2],
      top_logprobs: [{ ' y': -0.1, ' n': -2.5 }, { es: -0.2 }] } }],
    usage: { prompt_tokens: 4, completion_tokens: 2, total_tokens: 6 } });
  queue = [{ status: 200, body: rec }, { status: 200, body: rec }];
  const r = await sdk().completions.create({ model: 'gpt-4o-mini', prompt, max_tokens: 2,
    logprobs: 2 });
  const k = await kdkitAsk('completions', { max_tokens: 2, logprobs: true, top_logprobs: 2 },
    ['--logprobs', prompt]);
  assert.equal(k.status, 0, k.err);
  sameShape(seen.at(-2), seen.at(-1));
  assert.match(k.out, new RegExp(`^response: ${r.choices[0].text}$`, 'm'));
  const kdTokens = k.out.split('\n').filter((l) => l.startsWith('  ')).map((l) => l.slice(2).split('  ')[0]);
  assert.deepEqual(kdTokens, r.choices[0].logprobs.tokens);
});

test('an error with escape sequences: the SDK class, kdkit shows it escaped', async () => {
  const rec = JSON.stringify({ error: { message: 'bad \u001b[31mred\u001b[0m request',
    type: 'invalid_request_error', param: 'messages', code: null } });
  queue = [{ status: 400, body: rec }, { status: 400, body: rec }];
  await assert.rejects(sdk().chat.completions.create({ model: 'gpt-4o-mini', messages }),
    (e) => e instanceof BadRequestError && e.param === 'messages');
  const k = await kdkitAsk('chat', { max_tokens: 8 }, [prompt]);
  assert.equal(k.status, 1);
  assert.ok(!k.err.includes('\u001b'), 'no raw escape character on the terminal');
  assert.match(k.err, /\\x1b\[31mred/);
  assert.match(k.err, /not retried/);
});
