// The playground: this server's own API from a browser. The domains come from GET /v1/models, the answer
// streams from POST /v1/chat/completions (server-sent events, read from fetch's body: EventSource can
// neither POST nor send a bearer token), the cited passages' text from POST /v1/retrieve.
// The API key stays in this tab's sessionStorage and goes out only as the Authorization header.
"use strict";

const KEY_STORE = "retro-peft.api-key";
const LOOKUP_K = 10;        // passages asked of /v1/retrieve to find the cited ones' text (when k is the domain's)
const LOOKUP_MODE = "hybrid";  // and the search mode then (a domain's default, unless it set another)
const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = `Bearer ${apiKey()}`;
  return h;
}

function say(message, kind) {
  const status = $("status");
  status.textContent = message;
  status.className = kind || "";
}

// A failed response as one readable line: what happened, the server's own words, what to do.
async function problem(response) {
  let message = response.statusText || "no reason given";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  const retry = response.headers.get("Retry-After");
  const later = retry ? ` Try again in ${retry} s.` : "";
  switch (response.status) {
    case 401: return `Not authorized (401): ${message}. Enter a valid API key above.`;
    case 403: return `This API key may not do that (403): ${message}.`;
    case 404: return `Not found (404): ${message}.`;
    case 429: return `Rate limited (429): ${message}.${later}`;
    case 503: return `The server is busy or still loading (503): ${message}.${later}`;
    default: return `The request failed (${response.status}): ${message}.`;
  }
}

async function call(path, options) {
  try {
    return await fetch(path, options);
  } catch (e) {
    throw new Error(`Could not reach the server: ${e.message}`);
  }
}

async function loadDomains() {
  const response = await call("/v1/models", {headers: headers(false)});
  if (response.status === 503) {  // the model is still loading: ask again when the server says
    say(await problem(response), "error");
    setTimeout(() => loadDomains().catch((e) => say(e.message, "error")),
               1000 * Number(response.headers.get("Retry-After") || 2));
    return;
  }
  if (!response.ok) {
    say(await problem(response), "error");
    return;
  }
  const models = (await response.json()).data;
  const select = $("domain");
  const chosen = select.value;
  select.replaceChildren();
  const ordered = models.filter((m) => m.id === "auto").concat(models.filter((m) => m.id !== "auto"));
  for (const m of ordered) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.description ? `${m.id}: ${m.description}` : m.id;
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  say(`${models.length - 1} domains, or auto to route each question.`);
}

// The data of each server-sent event of a streamed response.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function retrievalOptions() {
  const options = {};
  const k = $("k").value.trim();
  if (k !== "") options.k = Number(k);
  if ($("mode").value) options.mode = $("mode").value;
  return options;
}

function setting(name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  $("settings").append(dt, dd);
}

function showSettings(asked, served, retrieval, last) {
  setting("domain", asked === "auto" ? `auto, routed to ${served}` : served);
  setting("passages (k)", retrieval.k !== undefined ? String(retrieval.k) : "the domain's own");
  setting("search mode", retrieval.mode || "the domain's own");
  if (!last) return;
  const choice = last.choice;
  setting("finish", choice.finish_reason + (choice.abstained ? " (abstained)" : ""));
  if (choice.answerability !== null && choice.answerability !== undefined) {
    setting("answerability", choice.answerability.toFixed(3));
  }
  if (last.usage) {
    setting("tokens", `${last.usage.prompt_tokens} prompt + ${last.usage.completion_tokens} answer`);
  }
}

// The cited passages with their text: the answer's citations name them (chunk id, title, score), and
// /v1/retrieve, asked the same question of the same domain, gives their text.
async function showCitations(served, question, retrieval, citations) {
  const list = $("citations");
  if (!citations.length) {
    const li = document.createElement("li");
    li.textContent = "No passage cited.";
    list.append(li);
    return;
  }
  let texts = new Map(), note = "";
  const body = {model: served, query: question, k: Math.max(retrieval.k ?? LOOKUP_K, citations.length),
                mode: retrieval.mode || LOOKUP_MODE};
  const response = await call("/v1/retrieve", {method: "POST", headers: headers(true), body: JSON.stringify(body)});
  if (response.ok) {
    texts = new Map((await response.json()).data.map((p) => [p.chunk_id, p.text]));
  } else {
    note = `Passage text unavailable: ${await problem(response)}`;
  }
  for (const c of citations) {
    const li = document.createElement("li");
    li.className = "citation";
    const title = document.createElement("h3");
    title.textContent = c.title || c.doc_id;
    const meta = document.createElement("p");
    meta.className = "meta";
    meta.textContent = `${c.doc_id} · ${c.chunk_id} · score ${c.score.toFixed(3)}`;
    const text = document.createElement("p");
    text.className = "passage";
    text.textContent = texts.get(c.chunk_id) || note || "(this passage's text was not among /v1/retrieve's results)";
    li.append(title, meta, text);
    list.append(li);
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    say("Type a question first.", "error");
    return;
  }
  const asked = $("domain").value;
  const retrieval = retrievalOptions();
  const body = {model: asked, messages: [{role: "user", content: question}], stream: true};
  if (Object.keys(retrieval).length) body.retrieval = retrieval;
  for (const id of ["answer", "settings", "citations"]) $(id).replaceChildren();
  $("result").hidden = true;
  $("ask").disabled = true;
  say("Asking...");
  try {
    const response = await call("/v1/chat/completions",
                                {method: "POST", headers: headers(true), body: JSON.stringify(body)});
    if (!response.ok) {
      say(await problem(response), "error");
      return;
    }
    $("result").hidden = false;
    let served = asked, last = null;
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {  // generation failed after the 200 went out
        say(`The answer stopped: ${chunk.error.message}`, "error");
        return;
      }
      served = chunk.model;
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) $("answer").append(choice.delta.content);
      if (choice.finish_reason) last = {choice, usage: chunk.usage};
    }
    showSettings(asked, served, retrieval, last);
    await showCitations(served, question, retrieval, (last && last.choice.citations) || []);
    say("Done.", "done");
  } catch (e) {
    say(e.message, "error");
  } finally {
    $("ask").disabled = false;
  }
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  loadDomains().catch((e) => say(e.message, "error"));
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  say("The key is forgotten.");
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("ask-form").addEventListener("submit", ask);
  loadDomains().catch((e) => say(e.message, "error"));
});
