// lopa live view: reads the trace stream POST /v1/trace (docs/serve.md, "Trace stream") and hands each named
// event to a run panel (app.js). fetch + a stream reader, since EventSource cannot POST.
"use strict";

async function traceRun(run, body) {
  let response;
  try {
    response = await fetch("/v1/trace", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error(`Cannot reach the lopa server at ${location.origin} (${e.message}). Is \`lopa serve\` still running?`);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(`The server refused run ${run.name.toUpperCase()} (${response.status}): ${message}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", finished = false;
  for (;;) {
    let chunk;
    try { chunk = await reader.read(); } catch (e) {
      throw new Error(`The connection to the server was lost during run ${run.name.toUpperCase()} (${e.message}).`);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const ev = JSON.parse(data);
      if (name === "start") run.start(ev);
      else if (name === "step") run.step(ev);
      else if (name === "done") { run.finish(ev); finished = true; }
      else if (name === "error") throw new Error(`The server stopped run ${run.name.toUpperCase()}: ${ev.error.message}`);
    }
  }
  if (!finished) throw new Error(`The connection closed before run ${run.name.toUpperCase()} finished (the server stopped?).`);
}
