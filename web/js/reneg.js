// ReNeg node pack: show the text a node reports (scores, tuning log, saved file) on the node itself.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["ReNegRewardScore", "ReNegPerSampleTune", "ReNegSaveEmbedding"]);
const WIDGET = "reneg_report";

app.registerExtension({
  name: "ReNeg.ShowReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // not part of the workflow's widget values
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      const size = this.computeSize();
      this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
