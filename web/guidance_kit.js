// Guidance Kit web extension: after a run, each technique node shows what its sampling run did
// ("CFG: 20 steps, 80 model rows", "AG: ... 11 of 40 saved vs CFG; cond only at step 9/20").
//
// The server sends "guidance_kit.run_summary" ({node, text, ...}) when a stats-attached run ends
// (nodes/run_stats.py); the Run Stats node's own summary arrives in its "executed" output
// (ui.text).  Either way the text goes into a read-only, non-serialized DOM widget on the node,
// and into node.guidanceKitSummary for scripts and tests.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION_NAME = "GuidanceKit.RunSummary";
const RUN_SUMMARY_EVENT = "guidance_kit.run_summary";
const SUMMARY_WIDGET = "guidance_kit_summary";
const RUN_STATS_NODE = "GuidanceKitRunStats";
const SUMMARY_HEIGHT = 44;

function nodeForExecutionId(executionId) {
  // Top-level node ids only: a summary from inside a subgraph ("outer:inner") is not shown.
  const graph = app.rootGraph ?? app.graph;
  return graph?.getNodeById(executionId) ?? null;
}

function summaryElement() {
  const element = document.createElement("div");
  element.className = "guidance-kit-summary";
  Object.assign(element.style, {
    boxSizing: "border-box",
    padding: "4px 6px",
    borderRadius: "4px",
    font: "12px/1.35 sans-serif",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderLeft: "3px solid #4a90d9",
    overflow: "auto",
    whiteSpace: "normal",
    userSelect: "text",
  });
  return element;
}

export function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === SUMMARY_WIDGET);
  if (!widget) {
    const element = summaryElement();
    widget = node.addDOMWidget(SUMMARY_WIDGET, "guidance_kit_summary", element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => element.textContent,
      setValue: (value) => { element.textContent = value; },
      getMinHeight: () => SUMMARY_HEIGHT,
      getMaxHeight: () => SUMMARY_HEIGHT * 2,
    });
    widget.serialize = false;
    const needed = node.computeSize();
    node.setSize([Math.max(node.size[0], needed[0], 260), Math.max(node.size[1], needed[1])]);
  }
  widget.element.textContent = text;
  widget.element.title = text;
  node.guidanceKitSummary = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: EXTENSION_NAME,

  setup() {
    api.addEventListener(RUN_SUMMARY_EVENT, ({ detail }) => {
      const node = nodeForExecutionId(String(detail.node));
      if (node && detail.text) showSummary(node, detail.text);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== RUN_STATS_NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = output?.text?.[0];
      if (text) showSummary(this, text);
    };
  },
});
