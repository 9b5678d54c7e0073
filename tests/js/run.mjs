// The npm `cloudflare` client against `sd serve`; prints one JSON report for
// tests/test_cloudflare_client.py.   node run.mjs BASE_URL TOKEN MODEL
import Cloudflare from 'cloudflare';

const [baseURL, apiToken, model] = process.argv.slice(2);
const client = new Cloudflare({ apiToken, baseURL, maxRetries: 0 });
const report = {};

// Text-to-image answers are PNG bytes: read the raw response, as from Cloudflare's REST API.
const response = await client.ai
  .run(model, { account_id: 'acc', prompt: 'a red circle', width: 256, height: 256, num_steps: 2, seed: 1 })
  .asResponse();
report.png = {
  status: response.status,
  contentType: response.headers.get('content-type'),
  base64: Buffer.from(await response.arrayBuffer()).toString('base64'),
};

async function failure(promise) {
  try {
    await promise;
    return { status: 200 };
  } catch (e) {
    return { status: e.status, name: e.constructor.name, errors: e.errors };
  }
}

report.badRequest = await failure(client.ai.run(model, { account_id: 'acc', prompt: 'a cat', width: 4000 }));
const wrong = new Cloudflare({ apiToken: 'wrong', baseURL, maxRetries: 0 });
const auth = await failure(wrong.ai.run(model, { account_id: 'acc', prompt: 'a cat' }));
report.authentication = { status: auth.status, name: auth.name };

report.models = [];
for await (const m of client.ai.models.list({ account_id: 'acc' })) report.models.push(m.name);

console.log(JSON.stringify(report));
