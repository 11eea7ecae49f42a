// Drives a mesh node's Ollama API with the official `ollama` JavaScript client (Node.js).
// Prints one JSON object with what it saw.
//
// Usage: NODE_PATH=... node ollama_client_check.cjs HOST CHAT_MODEL EMBED_MODEL
const { Ollama } = require("ollama");

async function main() {
  const [host, chatModel, embedModel] = process.argv.slice(2, 5);
  const client = new Ollama({ host });
  const out = {};
  out.version = (await client.version()).version;
  out.models = (await client.list()).models.map((m) => m.model).sort();
  out.ps = (await client.ps()).models.map((m) => m.model).sort();
  out.show = { capabilities: (await client.show({ model: chatModel })).capabilities };

  const messages = [{ role: "user", content: "Name the capital of France." }];
  const options = { temperature: 0, num_predict: 24 };
  const r = await client.chat({ model: chatModel, messages, options, stream: false });
  out.chat = { text: r.message.content, done_reason: r.done_reason, eval_count: r.eval_count };
  let text = "";
  let last = null;
  for await (const part of await client.chat({ model: chatModel, messages, options, stream: true })) {
    text += part.message.content;
    last = part;
  }
  out.stream = { text, done: last.done, eval_count: last.eval_count };
  const g = await client.generate({ model: chatModel, prompt: "Name the capital of France.", options });
  out.generate = { text: g.response, done_reason: g.done_reason };

  const e = await client.embed({
    model: embedModel,
    input: ["A man is eating food.", "A man is eating a piece of bread."],
  });
  const [a, b] = e.embeddings;
  out.embed = {
    count: e.embeddings.length,
    dims: a.length,
    norms: e.embeddings.map((v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0))),
    cosine: a.reduce((s, x, i) => s + x * b[i], 0),
  };

  const errors = {};
  const expect = async (name, fn) => {
    try {
      await fn();
      errors[name] = "no error";
    } catch (err) {
      errors[name] = { status: err.status_code ?? null, error: err.error ?? String(err), class: err.name };
    }
  };
  await expect("unknown_model", () => client.chat({ model: "no-such-model", messages }));
  await expect("bad_temperature", () =>
    client.chat({ model: chatModel, messages, options: { temperature: 5 } }));
  await expect("embed_with_chat_model", () => client.embed({ model: chatModel, input: "x" }));
  out.errors = errors;
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
