// NTI Photo Edit: show a node's text report (e.g. Null-text Optimize's per-step losses) on the
// node itself after it runs. The Python side sends it as the V3 ui output {"text": [report]}.
import { app } from "../../scripts/app.js";

const PREFIX = "NTI";
const WIDGET = "nti_report";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = node.addWidget("text", WIDGET, "", () => {}, { multiline: true, serialize: false });
    widget.serialize = false; // never stored in saved workflows (no widgets_values shift)
  }
  widget.value = text;
  if (widget.inputEl) {
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.8;
  }
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
      if (text && text.length) showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
