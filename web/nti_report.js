// NTI Photo Edit: show a node's text report (e.g. Null-text Optimize's per-step losses) on the
// node itself after it runs. The Python side sends it as the V3 ui output {"text": [report]}.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const PREFIX = "NTI";
const WIDGET = "nti_report";

const joined = (text) => (Array.isArray(text) ? text.join("\n") : String(text));

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    // A multiline STRING widget (a DOM textarea, like core Preview Any): a plain "text" widget
    // is one canvas line that shows only the start of the report and opens an edit prompt.
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in saved workflows' widgets_values (no shift on load)
    widget.options.serialize = false; // not sent as an input with the prompt (keeps the cache)
    const el = widget.inputEl ?? widget.element;
    if (el) {
      el.readOnly = true;
      el.style.opacity = 0.8;
    }
    const [w, h] = node.computeSize(); // the text area's minimum: grow so ~8 lines show
    node.setSize([Math.max(w, node.size[0]), Math.max(h + 100, node.size[1])]);
  }
  widget.value = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "NTI.PhotoEdit.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text && text.length) showText(this, joined(text));
    };
  },
  // The widget is not saved, so a graph the frontend reloads (e.g. on switching workflow tabs)
  // comes back without it; the frontend then hands the outputs it kept to this hook.
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      if (!/^\d+$/.test(id) || !output?.text?.length) continue; // root-graph nodes only
      const node = app.graph?.getNodeById(Number(id));
      if (node?.type?.startsWith(PREFIX)) showText(node, joined(output.text));
    }
  },
});
