// NTI Photo Edit: the optimisation's loss curve on Null-Text Optimize and StyleDiffusion Invert.
// Per step, the loss of its first iteration (light) and of its last (dark) on a log scale, drawn
// live from the "nti_photo_edit.loss" messages the node sends through ComfyUI's server
// ({node, step, total, first, final}, one per step) and restored from the node's UI output
// {"nti_loss": [{first: [...], final: [...]}]} after a run and on a workflow-tab switch.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODES = new Set(["NTINullTextOptimize", "NTIStyleInvert"]);
const EVENT = "nti_photo_edit.loss";
const OUTPUT = "nti_loss";
const WIDGET = "nti_loss_curve";
const HEIGHT = 110; // px of the node the curve takes
const FIRST = "#9cc3ef"; // light: a step's loss before its iterations
const FINAL = "#2f6fc6"; // dark: after them
const MARGIN = { left: 34, right: 8, top: 16, bottom: 14 };

const curves = new WeakMap(); // node → {first, final, total, canvas, widget}

// The widget is added at the first loss, as the report's. Frontend 1.27's Vue node renderer
// (experimental, off by default) shows only the widget types it knows, so the curve is drawn on
// the classic canvas only; under the Vue renderer it is kept (data-steps, data-total) unseen.

function addCurve(node) {
  const box = document.createElement("div");
  const canvas = document.createElement("canvas");
  canvas.className = "nti-loss-curve";
  canvas.style.cssText = "display:block;width:100%;height:100%";
  box.appendChild(canvas);
  const curve = { first: [], final: [], total: 0, canvas };
  curve.widget = node.addDOMWidget(WIDGET, WIDGET, box, {
    getMinHeight: () => HEIGHT,
    getMaxHeight: () => HEIGHT,
  });
  curve.widget.serialize = false; // not in saved workflows' widgets_values
  curve.widget.options.serialize = false; // not sent with the prompt (keeps the cache key)
  const resized = new ResizeObserver(() => draw(curve)); // mounted, zoomed, node resized
  resized.observe(canvas);
  const onRemove = curve.widget.onRemove;
  curve.widget.onRemove = function () {
    resized.disconnect();
    return onRemove?.apply(this, arguments);
  };
  curves.set(node, curve);
  const [w, h] = node.computeSize();
  node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
  return curve;
}

function show(node, curve) {
  draw(curve);
  node.setDirtyCanvas(true, true);
}

const steps = (curve) => curve.final.filter(Number.isFinite).length;

function draw(curve) {
  const { canvas, first, final, total } = curve;
  canvas.dataset.steps = String(steps(curve));
  canvas.dataset.total = String(total);
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return; // not on screen (collapsed, another graph, the Vue renderer)
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "rgba(0, 0, 0, 0.3)";
  ctx.fillRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  const values = [...first, ...final].filter((v) => v > 0);
  if (!total || !values.length) {
    ctx.fillStyle = "#999";
    ctx.textAlign = "center";
    ctx.fillText("loss per step: shown while the node optimises", w / 2, h / 2);
    return;
  }
  // y: log₁₀ of the loss, whole decades; x: step 1 … total
  let lo = Math.floor(Math.log10(Math.min(...values)));
  let hi = Math.ceil(Math.log10(Math.max(...values)));
  if (hi === lo) hi = lo + 1;
  const plotW = w - MARGIN.left - MARGIN.right;
  const plotH = h - MARGIN.top - MARGIN.bottom;
  const x = (i) => MARGIN.left + (total > 1 ? (i / (total - 1)) * plotW : plotW / 2);
  const y = (v) => MARGIN.top + ((hi - Math.log10(v)) / (hi - lo)) * plotH;
  ctx.strokeStyle = "rgba(255, 255, 255, 0.12)";
  ctx.fillStyle = "#aaa";
  ctx.textAlign = "right";
  const every = Math.ceil((hi - lo) / 4); // at most five decade labels
  for (let k = lo; k <= hi; k++) {
    const yk = y(10 ** k);
    ctx.beginPath();
    ctx.moveTo(MARGIN.left, yk);
    ctx.lineTo(w - MARGIN.right, yk);
    ctx.stroke();
    if ((k - lo) % every === 0) ctx.fillText(`1e${k}`, MARGIN.left - 3, yk);
  }
  for (const [series, color] of [[first, FIRST], [final, FINAL]]) {
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let open = false;
    for (let i = 0; i < total; i++) {
      if (!(series[i] > 0)) {
        open = false; // a step not heard of: a gap
        continue;
      }
      if (open) ctx.lineTo(x(i), y(series[i]));
      else ctx.moveTo(x(i), y(series[i]));
      open = true;
      ctx.fillRect(x(i) - 1, y(series[i]) - 1, 2, 2);
    }
    ctx.stroke();
  }
  ctx.textAlign = "left";
  ctx.fillStyle = FIRST;
  ctx.fillText("first", MARGIN.left, MARGIN.top / 2);
  ctx.fillStyle = FINAL;
  ctx.fillText("→ final", MARGIN.left + 24, MARGIN.top / 2);
  ctx.fillStyle = "#aaa";
  ctx.fillText("loss (log)", MARGIN.left + 64, MARGIN.top / 2);
  ctx.fillStyle = "#aaa";
  ctx.textAlign = "right";
  ctx.fillText(`${steps(curve)} / ${total} steps`, w - MARGIN.right, MARGIN.top / 2);
  ctx.textAlign = "left";
  ctx.fillText("1", MARGIN.left, h - MARGIN.bottom / 2);
  ctx.textAlign = "right";
  ctx.fillText(String(total), w - MARGIN.right, h - MARGIN.bottom / 2);
}

// "12" on the root graph, "5:12" inside subgraph node 5 (ComfyUI's execution ids)
function nodeByExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id ?? "").split(":")) {
    node = graph?.getNodeById?.(Number(part)) ?? null;
    graph = node?.subgraph;
  }
  return node && NODES.has(node.comfyClass ?? node.type) ? node : null;
}

// A finished run's curve, or none when it made no optimisation (Null-Text Optimize's direct and
// negative-prompt methods): then a curve shown from an earlier run is cleared.
function restore(node, output) {
  const loss = output?.[OUTPUT]?.[0];
  const curve = curves.get(node) ?? (loss ? addCurve(node) : null);
  if (!curve) return;
  curve.first = [...(loss?.first ?? [])];
  curve.final = [...(loss?.final ?? [])];
  curve.total = curve.final.length;
  show(node, curve);
}

app.registerExtension({
  name: "NTI.PhotoEdit.LossCurve",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = nodeByExecutionId(detail?.node);
      if (!node || !Number.isInteger(detail.step) || !(detail.total > 0)) return;
      const curve = curves.get(node) ?? addCurve(node);
      if (detail.step === 0 || detail.total !== curve.total) {
        Object.assign(curve, { first: [], final: [], total: detail.total }); // a new run
      }
      curve.first[detail.step] = detail.first;
      curve.final[detail.step] = detail.final;
      show(node, curve);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      restore(this, message);
    };
  },
  // The widget is not saved: a graph the frontend reloads (switching workflow tabs) comes back
  // without the curve, and the frontend then hands the outputs it kept to this hook.
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = nodeByExecutionId(id);
      if (node && output?.[OUTPUT]) restore(node, output);
    }
  },
});
