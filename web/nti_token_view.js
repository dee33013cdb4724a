// NTI Photo Edit: the token view on Attention Edit Plan (NTI). The source prompt and each target
// prompt as the engine tokenises them, each target token marked kept / replaced / added as the
// edit aligns it, the edit kind `auto` picks and the plan's warnings, before anything is queued.
// Nothing is tokenised or aligned here: the pack's route POST /nti_photo_edit/plan_view
// (nodes/routes.py → nti_core/plan_view.py) runs the engine's tokenizer and aligner on the
// widget values, debounced as the user types. A click on a target token adds its word to the
// reweight widget (word:2) or to blend_words, after which the view asks again.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "NTIAttentionEditPlan";
const WIDGET = "nti_token_view";
const ROUTE = "/nti_photo_edit/plan_view";
const DEBOUNCE_MS = 300;
const FACTOR = 2; // the reweight a click gives (above 1 strengthens the word)
const CLICKS = {
  reweight: { widget: "reweight", label: `click: reweight ×${FACTOR}`, add: (w) => `${w}:${FACTOR}` },
  blend: { widget: "blend_words", label: "click: blend word", add: (w) => w },
};
const MARKS = {
  source: "source prompt",
  kept: "kept: takes its own source token's attention",
  replaced: "replaced: takes another source token's attention",
  added: "added: new, its own attention",
  unaligned: "not aligned: see the warning",
};

const STYLE = `
.nti-token-view-root { font: 12px/1.5 sans-serif; color: var(--input-text, #ddd); overflow: auto;
  box-sizing: border-box; padding: 2px 4px; }
.nti-token-view-bar { display: flex; flex-wrap: wrap; gap: 4px 8px; align-items: center;
  margin-bottom: 4px; opacity: 0.9; }
.nti-click-mode { font-size: 11px; background: var(--comfy-input-bg, #222); color: inherit;
  border: 1px solid #555; border-radius: 3px; }
.nti-prompt { margin: 2px 0; }
.nti-prompt-label { display: inline-block; min-width: 5.5em; opacity: 0.7; font-size: 11px; }
.nti-word { display: inline-flex; margin: 1px 3px 1px 0; }
.nti-token { padding: 0 3px; border-radius: 3px; border: 1px solid transparent; }
.nti-word .nti-token + .nti-token { margin-left: 1px; }
.nti-token[data-mark=source] { background: #34495e; }
.nti-token[data-mark=kept] { background: #3d4248; }
.nti-token[data-mark=replaced] { background: #a0522d; }
.nti-token[data-mark=added] { background: #2e7d32; }
.nti-token[data-mark=unaligned] { border: 1px dashed #999; }
.nti-token[data-blend] { border-bottom: 2px solid #b39ddb; }
.nti-token[data-subtract] { text-decoration: line-through; }
.nti-token[data-reweight]::after { content: "×" attr(data-reweight); font-size: 9px;
  vertical-align: super; margin-left: 1px; }
.nti-prompt[data-role=target] .nti-token[data-word]:not([data-word=""]) { cursor: pointer; }
.nti-prompt[data-role=target] .nti-token[data-word]:not([data-word=""]):hover { outline: 1px solid #fff; }
.nti-token-count-over { color: #ff8a80; }
.nti-plan-warning { color: #ffb74d; margin: 2px 0; white-space: pre-wrap; }
.nti-view-status { opacity: 0.6; font-style: italic; }
`;

function addStyle() {
  if (document.getElementById("nti-token-view-style")) return;
  const style = document.createElement("style");
  style.id = "nti-token-view-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function legend() {
  const bar = el("span");
  for (const [mark, title] of Object.entries(MARKS)) {
    const chip = el("span", "nti-token", mark);
    chip.dataset.mark = mark;
    chip.title = title;
    bar.append(chip, " ");
  }
  const blend = el("span", "nti-token", "blend");
  blend.dataset.blend = "true";
  blend.title = "a LocalBlend word";
  const weight = el("span", "nti-token", "weight");
  weight.dataset.reweight = String(FACTOR);
  weight.title = "a reweighted word";
  bar.append(blend, " ", weight);
  return bar;
}

function tokenTitle(token, source) {
  const parts = [`${token.text} (position ${token.pos})`];
  const from = (token.from ?? []).map((p) => source?.tokens.find((t) => t.pos === p)?.text ?? p);
  if (token.mark === "kept" || token.mark === "replaced") parts.push(`${token.mark}, from ${from.join(" + ")}`);
  else parts.push(MARKS[token.mark ?? "unaligned"]);
  if (token.reweight != null) parts.push(`reweight ×${token.reweight}`);
  if (token.blend) parts.push("blend word");
  if (token.subtract) parts.push("subtract word");
  return parts.join(" · ");
}

function promptRow(prompt, source, maxLength, onClick) {
  const row = el("div", "nti-prompt");
  row.dataset.role = prompt.role;
  row.dataset.index = String(prompt.index);
  const label = el("span", "nti-prompt-label", prompt.role === "source" ? "source" : `target ${prompt.index + 1}`);
  const count = el("span", prompt.n_tokens > maxLength ? "nti-token-count-over" : "", ` ${prompt.n_tokens}/${maxLength}`);
  label.append(count);
  row.append(label);
  let word = null;
  let group = null;
  for (const token of prompt.tokens) {
    if (token.word_index !== word) {
      word = token.word_index;
      group = el("span", "nti-word");
      row.append(group);
    }
    const span = el("span", "nti-token", token.text);
    span.dataset.mark = token.mark ?? "unaligned";
    span.dataset.word = token.word;
    span.dataset.pos = String(token.pos);
    if (token.reweight != null) span.dataset.reweight = String(token.reweight);
    if (token.blend) span.dataset.blend = "true";
    if (token.subtract) span.dataset.subtract = "true";
    span.title = tokenTitle(token, source);
    if (prompt.role === "target" && token.word) {
      span.addEventListener("click", (event) => {
        event.stopPropagation();
        onClick(token);
      });
    }
    group.append(span);
  }
  return row;
}

function render(view, data, onClick) {
  view.replaceChildren();
  view.dataset.editKind = data.edit_kind ?? "";
  const source = data.prompts.find((p) => p.role === "source");
  if (data.edit_kind) view.append(el("div", "nti-view-status", `edit: ${data.edit_kind}`));
  for (const prompt of data.prompts) view.append(promptRow(prompt, source, data.max_length, onClick));
  for (const warning of data.warnings) {
    const div = el("div", "nti-plan-warning", warning.message);
    div.dataset.field = warning.field;
    view.append(div);
  }
}

// Grow (never shrink) the node to what its widgets need: a workflow saved with a smaller node,
// or a longer prompt, would otherwise hide the targets behind the view's scroll bar.
function fit(node) {
  const [w, h] = node.computeSize();
  if (node.size[0] < w || node.size[1] < h) node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
}

function attachTokenView(node, fieldNames) {
  addStyle();
  const root = el("div", "nti-token-view-root");
  const bar = el("div", "nti-token-view-bar");
  const mode = el("select", "nti-click-mode");
  for (const [value, { label }] of Object.entries(CLICKS)) {
    const option = el("option", "", label);
    option.value = value;
    mode.append(option);
  }
  mode.title = "What a click on a target token does";
  bar.append(mode, legend());
  const view = el("div", "nti-token-view");
  view.append(el("div", "nti-view-status", "…"));
  root.append(bar, view);

  const widget = node.addDOMWidget(WIDGET, "nti_token_view", root, {
    serialize: false, // not sent with the prompt: no input of the node
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    // what the view needs (a saved node may be smaller: see fit), at most a screenful
    getMinHeight: () => Math.min(400, Math.max(110, bar.offsetHeight + view.scrollHeight + 20)),
  });
  widget.serialize = false; // not in saved workflows' widgets_values (older files load as before)

  const fields = () => node.widgets.filter((w) => fieldNames.has(w.name));
  let timer = null;
  let asked = 0;

  async function refresh() {
    clearTimeout(timer);
    const ticket = ++asked;
    const values = {};
    for (const w of fields()) if (w.value !== undefined && w.value !== null) values[w.name] = w.value;
    let data;
    try {
      const reply = await api.fetchApi(ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ fields: values }),
      });
      data = await reply.json().catch(() => ({ error: `HTTP ${reply.status}` }));
      if (!reply.ok) data = { error: data.error ?? `HTTP ${reply.status}` };
    } catch (error) {
      data = { error: String(error) };
    }
    if (ticket !== asked) return; // a newer request is on its way
    if (data.error) {
      view.replaceChildren(el("div", "nti-view-status", `token view unavailable: ${data.error}`));
    } else {
      render(view, data, click);
    }
    fit(node);
    node.setDirtyCanvas(true, true);
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, DEBOUNCE_MS);
  }

  function click(token) {
    const action = CLICKS[mode.value];
    const target = node.widgets.find((w) => w.name === action.widget);
    if (!target) return;
    const already = mode.value === "reweight" ? token.reweight != null : token.blend;
    if (!already) {
      const current = String(target.value ?? "").trim().replace(/[,;\s]+$/, "");
      target.value = current ? `${current}, ${action.add(token.word)}` : action.add(token.word);
      target.callback?.(target.value); // as an edit by hand: other extensions hear of it
    }
    refresh();
  }

  for (const w of fields()) {
    const callback = w.callback;
    w.callback = function (...args) {
      const out = callback?.apply(this, args);
      schedule();
      return out;
    };
  }
  return { widget, schedule };
}

app.registerExtension({
  name: "NTI.PhotoEdit.TokenView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const fieldNames = new Set(
      [nodeData.input?.required, nodeData.input?.optional].flatMap((inputs) => Object.keys(inputs ?? {})),
    );
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const out = onNodeCreated?.apply(this, arguments);
      this.ntiTokenView = attachTokenView(this, fieldNames);
      fit(this);
      this.ntiTokenView.schedule();
      return out;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const out = onConfigure?.apply(this, arguments);
      this.ntiTokenView?.schedule(); // the saved widget values are in place now
      return out;
    };
  },
});
