// Drives a mesh node's OpenAI-compatible gateway with the official OpenAI JavaScript client
// (the `openai` npm package). Prints one JSON object with what it saw.
//
// Usage: node openai_client_check.cjs BASE_URL CHAT_MODEL EMBED_MODEL
// (with NODE_PATH pointing at a node_modules that holds `openai`)
const OpenAI = require("openai");

async function main() {
  const [base, chatModel, embedModel] = process.argv.slice(2);
  const client = new OpenAI({ baseURL: base, apiKey: "unused", maxRetries: 0, timeout: 120000 });
  const out = {};
  const question = [{ role: "user", content: "Name the capital of France." }];

  const models = [];
  for await (const m of client.models.list()) models.push(m.id);
  out.models = [...new Set(models)].sort();

  const r = await client.chat.completions.create({
    model: chatModel, messages: question, temperature: 0, max_tokens: 24,
  });
  out.chat = { text: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage };

  const stream = await client.chat.completions.create({
    model: chatModel, messages: question, temperature: 0, max_tokens: 24,
    stream: true, stream_options: { include_usage: true },
  });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks += 1;
    if (c.choices.length) {
      text += c.choices[0].delta.content || "";
      finish = c.choices[0].finish_reason || finish;
    }
    if (c.usage) usage = c.usage;
  }
  out.stream = { text, finish, usage, chunks };

  const many = await client.embeddings.create({
    model: embedModel, input: ["A man is eating food.", "A man is eating a piece of bread."],
  });
  const [a, b] = many.data.map((d) => d.embedding);
  out.embeddings = { batch: many.data.length, dims: a.length, cosine: a.reduce((s, x, i) => s + x * b[i], 0) };

  const errors = {};
  const expect = async (name, call) => {
    try {
      await call();
      errors[name] = "no error";
    } catch (e) {
      errors[name] = { status: e.status, type: e.type ?? (e.error && e.error.type) ?? null, class: e.constructor.name };
    }
  };
  await expect("unknown_model", () =>
    client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "hi" }] }));
  await expect("bad_temperature", () =>
    client.chat.completions.create({ model: chatModel, messages: [{ role: "user", content: "hi" }], temperature: 5 }));
  await expect("embed_with_chat_model", () => client.embeddings.create({ model: chatModel, input: "x" }));
  out.errors = errors;
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
