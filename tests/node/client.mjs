// The official openai npm package against the proxy: chat, stream, images, models, one error.
// Run by tests/test_node_sdk.py with PROXY_BASE_URL and PROXY_API_KEY set; prints one JSON line.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.PROXY_BASE_URL, apiKey: process.env.PROXY_API_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "你好" }];
const report = {};

const chat = await client.chat.completions.create({ model: "gpt-4o-mini", messages });
assert.equal(chat.object, "chat.completion");
assert.equal(chat.choices[0].message.role, "assistant");
assert.ok(chat.usage.total_tokens > 0);
report.chat = chat.choices[0].message.content;

const stream = await client.chat.completions.create({
  model: "gpt-4o-mini", messages, stream: true, stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
assert.ok(usage && usage.total_tokens > 0);
report.stream = streamed;

const image = await client.images.generate({ model: "dall-e-3", prompt: "一只橘猫" });
assert.equal(image.data.length, 1);
report.image = image.data[0].url;

const ids = [];
for await (const model of client.models.list()) ids.push(model.id);
report.models = ids;
report.retrieved = (await client.models.retrieve("gpt-4o-mini")).owned_by;

try {
  await client.chat.completions.create({ model: "no-such-model", messages });
  assert.fail("an unknown model must be refused");
} catch (err) {
  assert.ok(err instanceof OpenAI.NotFoundError, `expected NotFoundError, got ${err}`);
  report.error = { status: err.status, code: err.code, param: err.param, type: err.type };
}

console.log(JSON.stringify(report));
