// dsvl2 web chat: keeps the conversation in the page, streams answers from /v1/chat/completions
// (server-sent events), and draws the answer's grounding boxes (the "grounding" extension field of
// the last chunk, pixel boxes on the conversation's last image) over that image with their labels.
"use strict";

// processing/grounding.py COLORS, the official demo's box colours
const COLORS = ["#ff0000", "#00ff00", "#0000ff", "#00ffff", "#ffff00", "#ff00ff", "#7f7f7f", "#ffff7f",
                "#ff7fff", "#7fffff", "#7f7fff", "#7fff7f", "#ff7f7f"];
const $ = (id) => document.getElementById(id);
// black text on light colours, white on dark ones (relative luminance of "#rrggbb")
const textColor = (hex) => {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 ? "#000" : "#fff";
};
const state = { model: null, history: [], images: [], pending: [], busy: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || sessionStorage.getItem("dsvl2-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function needKey(message) {
  $("key-box").hidden = false;
  $("api-key").focus();
  addError(message || "This server needs an API key.");
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) { $("model").textContent = "API key needed"; return needKey(); }
  const body = await r.json();
  state.model = body.data[0].id;
  $("model").textContent = state.model + " · context " + body.data[0].max_model_len;
}

function addMessage(role, text, thumbs) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (thumbs && thumbs.length) {
    const row = document.createElement("div");
    row.className = "thumbs";
    for (const src of thumbs) { const img = new Image(); img.src = src; row.append(img); }
    el.append(row);
  }
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  el.append(content);
  $("log").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function addError(message) { return addMessage("error", message); }

// Show <|ref|>label<|/ref|> as a coloured label and <|det|>[[...]]<|/det|> as a small grey chip.
function renderAnswer(el, text) {
  el.textContent = "";
  const re = /<\|ref\|>([\s\S]*?)<\|\/ref\|>|<\|det\|>([\s\S]*?)<\|\/det\|>|<\|grounding\|>/g;
  let last = 0, box = 0, m;
  while ((m = re.exec(text)) !== null) {
    el.append(text.slice(last, m.index));
    if (m[1] !== undefined) {
      const span = document.createElement("span");
      span.className = "ref";
      span.style.borderBottomColor = COLORS[box % COLORS.length];
      span.textContent = m[1];
      el.append(span);
    } else if (m[2] !== undefined) {
      const span = document.createElement("span");
      span.className = "det";
      span.textContent = m[2];
      el.append(span);
      box += (m[2].match(/\[[^\[\]]*\]/g) || []).length;
    }
    last = re.lastIndex;
  }
  el.append(text.slice(last));
}

function drawBoxes(msgEl, src, boxes) {
  const img = new Image();
  img.onload = () => {
    const scale = Math.min(1, 640 / img.naturalWidth);
    const canvas = document.createElement("canvas");
    canvas.className = "boxes";
    canvas.width = Math.round(img.naturalWidth * scale);
    canvas.height = Math.round(img.naturalHeight * scale);
    canvas.dataset.boxCount = String(boxes.length);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    ctx.font = "bold 14px system-ui, sans-serif";
    ctx.textBaseline = "top";
    boxes.forEach((b, i) => {
      const [x1, y1, x2, y2] = b.box.map((v) => v * scale);
      const color = COLORS[i % COLORS.length];
      ctx.lineWidth = 3;
      ctx.strokeStyle = color;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      if (!b.label) return;
      // label on a tab of the box colour, above the box (inside it at the top edge of the image)
      const w = ctx.measureText(b.label).width + 8, h = 18;
      const tx = Math.max(0, Math.min(x1 - 1.5, canvas.width - w)), ty = y1 - h >= 0 ? y1 - h : y1;
      ctx.fillStyle = color;
      ctx.fillRect(tx, ty, w, h);
      ctx.fillStyle = textColor(color);
      ctx.fillText(b.label, tx + 4, ty + 2);
    });
    msgEl.append(canvas);
    msgEl.scrollIntoView({ block: "end" });
  };
  img.src = src;
}

// The context bar: image tokens (orange) and text (blue) of the last request, out of the context limit.
function showBudget(usage) {
  if (!usage.context_limit) return;
  const images = (usage.image_tokens || []).reduce((a, b) => a + b, 0);
  const used = usage.context_limit - usage.context_remaining;
  const pct = (n) => `${(100 * n / usage.context_limit).toFixed(2)}%`;
  $("budget").querySelector(".images").style.width = pct(images);
  $("budget").querySelector(".text").style.width = pct(used - images);
  const each = (usage.image_tokens || []).length ? ` (images ${usage.image_tokens.join(" + ")})` : "";
  $("budget-label").textContent = `context ${used} / ${usage.context_limit} tokens${each} · ${usage.context_remaining} left`;
  $("budget").hidden = false;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (file.type.startsWith("image/")) state.pending.push(await readFile(file));
  }
  showAttachments();
}

function showAttachments() {
  const box = $("attachments");
  box.textContent = "";
  state.pending.forEach((src, i) => {
    const fig = document.createElement("figure");
    const img = new Image();
    img.src = src;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { state.pending.splice(i, 1); showAttachments(); };
    fig.append(img, remove);
    box.append(fig);
  });
}

function* sseEvents(buffer) {
  let end;
  while ((end = buffer.text.indexOf("\n\n")) !== -1) {
    const block = buffer.text.slice(0, end);
    buffer.text = buffer.text.slice(end + 2);
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (data) yield data;
  }
}

async function send(event) {
  event.preventDefault();
  const question = $("prompt").value.trim();
  if (state.busy || (!question && !state.pending.length)) return;
  const text = ($("grounding-toggle").checked && !question.startsWith("<|grounding|>") ? "<|grounding|>" : "") + question;
  const images = state.pending.splice(0);
  const content = [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))];
  const userMsg = { role: "user", content };
  addMessage("user", question, images);
  $("prompt").value = "";
  showAttachments();
  const answerEl = addMessage("assistant", "");
  const target = answerEl.querySelector(".content");
  answerEl.classList.add("streaming");
  state.busy = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let answer = "", grounding = null, finish = null, usage = null;
  try {
    const body = {
      model: state.model || undefined, stream: true, stream_options: { include_usage: true },
      messages: [...state.history, userMsg],
      max_tokens: Number($("max-tokens").value) || undefined, temperature: Number($("temperature").value) || 0,
      image_token_budget: Number($("image-budget").value) || undefined,
    };
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.busy.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      answerEl.remove();
      if (r.status === 401) needKey(err.error.message); else addError(`${r.status}: ${err.error.message}`);
      state.pending.push(...images);
      showAttachments();
      return;
    }
    const reader = r.body.getReader(), decoder = new TextDecoder(), buffer = { text: "" };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer.text += decoder.decode(value, { stream: true });
      for (const data of sseEvents(buffer)) {
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta.content) { answer += choice.delta.content; target.textContent = answer; }
        if (choice.delta.grounding) grounding = choice.delta.grounding;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      answerEl.scrollIntoView({ block: "end" });
    }
    state.history.push(userMsg, { role: "assistant", content: answer });
    state.images.push(...images);
    renderAnswer(target, answer);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = [finish && "finish: " + finish, usage && `${usage.prompt_tokens} + ${usage.completion_tokens} tokens`,
                        grounding && grounding.length + " box(es)"].filter(Boolean).join(" · ");
    answerEl.append(meta);
    if (usage) showBudget(usage);
    const drawable = (grounding || []).filter((b) => b.box);
    if (drawable.length) drawBoxes(answerEl, state.images[drawable[0].image_index], drawable);
  } catch (err) {
    if (err.name === "AbortError") { target.textContent = answer + " [stopped]"; }
    else addError(String(err.message || err));
  } finally {
    answerEl.classList.remove("streaming");
    answerEl.classList.add("done");
    state.busy = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("file").addEventListener("change", (e) => { attach(e.target.files); e.target.value = ""; });
$("stop").addEventListener("click", () => state.busy && state.busy.abort());
$("new-chat").addEventListener("click", () => {
  state.history = []; state.images = []; $("budget").hidden = true;
  $("log").querySelectorAll(".msg").forEach((el) => el.remove());
});
$("api-key").addEventListener("change", (e) => { sessionStorage.setItem("dsvl2-key", e.target.value); loadModel(); });
window.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData || {}).files || []];
  if (files.length) { e.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => { e.preventDefault(); attach(e.dataTransfer.files); });
loadModel().catch((err) => { $("model").textContent = "offline"; addError(String(err)); });
