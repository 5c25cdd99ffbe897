// ComfyUI-DomainStudio frontend: live training display inside the body of DomainStudio_* nodes.
//
// The trainer nodes send "domainstudio.progress" events (status, stage, step/total, a preformatted
// progress line, the loss history downsampled to <= 256 points, an optional message) to the client
// that queued the prompt. This extension shows them in a DOM widget (node.addDOMWidget): a progress
// line, a loss chart of every term with a legend (log scale when the terms differ a lot), and the
// message. A DOM widget is drawn by both of the frontend's renderers: the classic LiteGraph canvas
// (positioned over the node body) and Nodes 2.0 / Vue nodes (mounted inside the node's DOM), which
// does not call onDrawForeground. Sample previews and the final images come through ComfyUI's stock
// mechanisms (ProgressBar previews, UI images) and are shown by the frontend itself.
//
// Defensive by design: every handler catches its own errors; missing fields or APIs are ignored.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The nodes that train (the fake one is the browser tests' stand-in); the image set and Load Weights
// nodes send no progress and get no display.
const TRAINERS = new Set(["DomainStudio_Train", "DomainStudio_Personalize", "DomainStudio_TestFakeTrainer"]);
const EVENT = "domainstudio.progress";
const WIDGET = "domainstudio_progress";
const MIN_HEIGHT = 170;
const COLORS = ["#4e9cff", "#ff9f43", "#2ecc71", "#e056fd", "#ff6b6b", "#48dbfb", "#feca57", "#a4b0be"];
const SVG_NS = "http://www.w3.org/2000/svg";
const VB_W = 300, VB_H = 100; // chart viewBox; stretched to the element (preserveAspectRatio none)

const runs = new Map(); // node id (string) -> run state (see normalize())
const views = new Set(); // mounted widgets: { node, el, parts }
let currentPrompt = null; // prompt id from execution_start
let executing = null; // node id ComfyUI reports as executing

const key = (id) => (id === null || id === undefined || id === "" ? null : String(id));
const ours = (node) => TRAINERS.has(String(node?.comfyClass ?? node?.type ?? ""));
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const safe = (fn) => (...args) => {
  try { return fn(...args); } catch (e) { console.warn("[DomainStudio]", e); return undefined; }
};

function fmtTime(sec) {
  if (num(sec) === null || sec < 0) return "?";
  sec = Math.round(sec);
  const h = Math.floor(sec / 3600), m = Math.floor((sec % 3600) / 60), s = sec % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
}

function fmtNum(v) {
  if (num(v) === null) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return v.toPrecision(3).replace(/\.?0+$/, "");
}

function findNode(id) {
  try {
    const g = app?.graph;
    if (!g || id === null) return null;
    return g.getNodeById?.(id) ?? g.getNodeById?.(Number(id)) ?? null;
  } catch { return null; }
}

// Does the run stored under `id` (an execution id, "12" or "5:12" inside a subgraph) belong to `node`?
function viewKey(node) {
  const own = key(node?.id);
  if (own === null) return null;
  if (runs.has(own)) return own;
  if (node.graph && node.graph !== app?.graph) {
    for (const k of runs.keys()) if (k.endsWith(`:${own}`)) return k;
  }
  return own;
}

// ------------------------------------------------------------------------------------ run state

function normalizeLoss(loss) {
  const steps = Array.isArray(loss?.steps) ? loss.steps.map(Number) : [];
  const terms = {};
  if (loss?.terms && typeof loss.terms === "object") {
    for (const [name, vals] of Object.entries(loss.terms)) {
      if (Array.isArray(vals) && vals.length === steps.length) terms[String(name)] = vals.map(Number);
    }
  }
  return { steps, terms };
}

function normalize(d) {
  return {
    promptId: d.prompt_id ?? null,
    status: ["running", "done", "cancelled", "error"].includes(d.status) ? d.status : "running",
    stage: typeof d.stage === "string" ? d.stage : "",
    step: num(d.step) ?? 0,
    total: num(d.total) ?? 0,
    elapsed: num(d.elapsed),
    sPerStep: num(d.s_per_step),
    eta: num(d.eta),
    text: typeof d.text === "string" ? d.text : "",
    loss: normalizeLoss(d.loss),
    message: typeof d.message === "string" ? d.message : "",
  };
}

function progressLine(run) {
  if (!run) return "";
  if (run.status === "starting") return "starting…";
  let line = run.text;
  if (!line) {
    const parts = [run.total > 0 ? `step ${run.step}/${run.total}` : `step ${run.step}`];
    if (run.sPerStep !== null) parts.push(`${run.sPerStep.toFixed(2)} s/step`);
    if (run.status === "running" && run.eta !== null) parts.push(`ETA ${fmtTime(run.eta)}`);
    else if (run.elapsed !== null) parts.push(fmtTime(run.elapsed));
    line = parts.join(" · ");
  }
  if (run.status === "running") return run.stage ? `${run.stage} · ${line}` : line;
  // A finished run shows no estimate of a time that will not come.
  line = line.split(" · ").filter((p) => !/^\s*ETA\b/.test(p)).join(" · ");
  return `${run.status} · ${line}`;
}

// ------------------------------------------------------------------------------------ the widget

function h(tag, style, text) {
  const el = document.createElement(tag);
  if (style) el.style.cssText = style;
  if (text !== undefined) el.textContent = text;
  return el;
}

function buildView(node) {
  const el = h("div", "display:flex;flex-direction:column;gap:3px;box-sizing:border-box;width:100%;height:100%;"
    + `min-height:${MIN_HEIGHT - 20}px;padding:4px 6px;overflow:hidden;border-radius:6px;`
    + "font:11px/1.3 sans-serif;color:var(--input-text,#ddd);background:var(--comfy-input-bg,#222);"
    + "border:1px solid var(--border-color,#444);pointer-events:none;");
  el.className = "domainstudio-progress";
  const text = h("div", "font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;");
  text.className = "domainstudio-progress-text";
  const chartBox = h("div", "position:relative;flex:1 1 auto;min-height:70px;");
  chartBox.className = "domainstudio-progress-chart";
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${VB_W} ${VB_H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  // The plot keeps 11 px free above and below for the axis labels.
  svg.style.cssText = "position:absolute;left:0;right:0;top:11px;bottom:11px;width:100%;height:calc(100% - 22px);"
    + "overflow:visible;";
  const label = "position:absolute;font-size:9px;line-height:10px;opacity:.75;white-space:nowrap;";
  const yMax = h("div", `${label}left:2px;top:0;`);
  const yMin = h("div", `${label}left:2px;bottom:0;`);
  const xLab = h("div", `${label}right:2px;bottom:0;`);
  const empty = h("div", "position:absolute;inset:0;display:flex;align-items:center;justify-content:center;"
    + "opacity:.55;text-align:center;");
  chartBox.append(svg, yMax, yMin, xLab, empty);
  const legend = h("div", "display:flex;flex-wrap:wrap;gap:2px 10px;font-size:10px;");
  legend.className = "domainstudio-progress-legend";
  const msg = h("div", "font-size:10px;opacity:.85;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;");
  msg.className = "domainstudio-progress-message";
  el.append(text, chartBox, legend, msg);
  return { node, el, parts: { text, svg, yMax, yMin, xLab, empty, legend, msg } };
}

function drawChart(parts, loss) {
  const { svg, yMax, yMin, xLab, empty } = parts;
  svg.replaceChildren();
  const steps = loss?.steps ?? [];
  const names = Object.keys(loss?.terms ?? {});
  const vals = names.flatMap((n) => loss.terms[n]).filter((v) => Number.isFinite(v));
  if (!steps.length || !names.length || !vals.length) {
    yMax.textContent = yMin.textContent = xLab.textContent = "";
    empty.textContent = "loss chart appears when training starts";
    empty.style.display = "flex";
    return { points: 0, log: false };
  }
  empty.style.display = "none";
  let lo = Math.min(...vals), hi = Math.max(...vals);
  const log = lo > 0 && hi / lo >= 20; // terms (or one term over time) spanning decades
  const f = log ? Math.log10 : (v) => v;
  let a = f(lo), b = f(hi);
  if (b - a < 1e-12) { a -= 0.5; b += 0.5; }
  const pad = (b - a) * 0.05;
  a -= pad; b += pad;
  const x0 = steps[0], x1 = steps[steps.length - 1] > x0 ? steps[steps.length - 1] : x0 + 1;
  const X = (s) => ((s - x0) / (x1 - x0)) * VB_W;
  const Y = (v) => VB_H - ((f(v) - a) / (b - a)) * VB_H;
  for (const frac of [0.25, 0.5, 0.75]) { // light grid
    const line = document.createElementNS(SVG_NS, "line");
    line.setAttribute("x1", "0"); line.setAttribute("x2", String(VB_W));
    line.setAttribute("y1", String(VB_H * frac)); line.setAttribute("y2", String(VB_H * frac));
    line.setAttribute("stroke", "currentColor"); line.setAttribute("stroke-opacity", "0.12");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  }
  // The first term (the total) is drawn last, dashed, so it stays visible over a term it equals.
  names.map((name, i) => [name, i]).reverse().forEach(([name, i]) => {
    const pts = [];
    loss.terms[name].forEach((v, j) => {
      if (Number.isFinite(v) && (!log || v > 0)) pts.push(`${X(steps[j]).toFixed(2)},${Y(v).toFixed(2)}`);
    });
    if (pts.length === 1) pts.push(pts[0]); // a single point still shows as a dot-length line
    const pl = document.createElementNS(SVG_NS, "polyline");
    pl.setAttribute("points", pts.join(" "));
    pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", COLORS[i % COLORS.length]);
    pl.setAttribute("stroke-width", i === 0 ? "2" : "1.6");
    if (i === 0 && names.length > 1) pl.setAttribute("stroke-dasharray", "5 3");
    pl.setAttribute("stroke-linecap", "round");
    pl.setAttribute("vector-effect", "non-scaling-stroke");
    pl.dataset.term = name;
    svg.appendChild(pl);
  });
  yMax.textContent = fmtNum(log ? 10 ** b : b) + (log ? " (log)" : "");
  yMin.textContent = fmtNum(log ? 10 ** a : a);
  xLab.textContent = `step ${steps[steps.length - 1]}`;
  return { points: steps.length, log };
}

function drawLegend(parts, loss) {
  parts.legend.replaceChildren();
  Object.keys(loss?.terms ?? {}).forEach((name, i) => {
    const vals = loss.terms[name];
    const item = h("span", "white-space:nowrap;");
    const sw = h("span", `display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle;`
      + `background:${COLORS[i % COLORS.length]};`);
    item.append(sw, document.createTextNode(`${name} ${fmtNum(vals[vals.length - 1])}`));
    item.dataset.term = name;
    parts.legend.appendChild(item);
  });
}

function render(view) {
  const { el, parts, node } = view;
  const run = runs.get(viewKey(node));
  const status = run?.status ?? "idle";
  el.dataset.dsNode = String(node.id);
  el.dataset.dsStatus = status;
  el.dataset.dsStep = String(run?.step ?? 0);
  el.dataset.dsTotal = String(run?.total ?? 0);
  el.dataset.dsPrompt = run?.promptId ?? "";
  parts.text.textContent = run ? progressLine(run) : "not trained yet";
  parts.text.style.color = status === "cancelled" || status === "error" ? "#f88"
    : status === "done" ? "#8d8" : "";
  const chart = drawChart(parts, run?.loss);
  el.dataset.dsPoints = String(chart.points);
  el.dataset.dsLog = chart.log ? "1" : "0";
  drawLegend(parts, run?.loss);
  parts.msg.textContent = run?.message ?? "";
  parts.msg.style.display = run?.message ? "" : "none";
}

function renderAll() {
  for (const v of [...views]) {
    // A node taken out of its graph without onRemoved (a graph cleared wholesale) is forgotten.
    if (v.node.graph) v.seenInGraph = true;
    else if (v.seenInGraph) { views.delete(v); continue; }
    safe(render)(v);
  }
  try { app?.graph?.setDirtyCanvas?.(true, false); } catch { /* ignore */ }
}

function attach(node) {
  if (!ours(node) || typeof node.addDOMWidget !== "function") return;
  if (node.widgets?.some((w) => w?.name === WIDGET)) return;
  const view = buildView(node);
  const widget = node.addDOMWidget(WIDGET, WIDGET, view.el, {
    serialize: false, // not an input: stays out of the prompt and of widgets_values
    hideOnZoom: true,
    getMinHeight: () => MIN_HEIGHT,
    getValue: () => "",
    setValue: () => {},
  });
  if (widget) widget.serialize = false;
  views.add(view);
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    views.delete(view);
    return onRemoved?.apply(this, args);
  };
  render(view);
  // Older saved workflows are smaller than the node with its chart: grow it, never shrink.
  try {
    const min = node.computeSize?.();
    if (min && node.size && (node.size[0] < min[0] || node.size[1] < min[1])) {
      node.setSize?.([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    }
  } catch { /* sizing is cosmetic */ }
}

// ------------------------------------------------------------------------------------ events

function onProgress(ev) {
  const d = ev?.detail;
  if (!d || typeof d !== "object") return;
  const id = key(d.node);
  if (id === null) return;
  const run = normalize(d);
  const prev = runs.get(id);
  // A later event of the same run that carries no history keeps the chart it had.
  if (prev && prev.promptId === run.promptId && !run.loss.steps.length && prev.loss?.steps?.length) {
    run.loss = prev.loss;
  }
  runs.set(id, run);
  renderAll();
}

// Stock progress of one of our nodes, for stages (or older nodes) without domainstudio events:
// shown only while no domainstudio event of that run has arrived.
function onStockProgress(ev) {
  const d = ev?.detail;
  if (!d || typeof d !== "object") return;
  const id = key(d.node ?? executing);
  if (id === null || !ours(findNode(id))) return;
  const prev = runs.get(id);
  const promptId = d.prompt_id ?? prev?.promptId ?? currentPrompt;
  if (prev && prev.promptId === promptId && prev.status !== "starting" && !prev.fromStock) return;
  runs.set(id, { ...normalize({ step: d.value, total: d.max, prompt_id: promptId }), fromStock: true });
  renderAll();
}

function onExecutionStart(ev) {
  currentPrompt = ev?.detail?.prompt_id ?? null;
}

// The node starts: a new run clears the previous run's chart at once (the first event may come
// only after models are loaded).
function onExecuting(ev) {
  const d = ev?.detail;
  const id = key(d && typeof d === "object" ? (d.display_node ?? d.node) : d);
  const promptId = (d && typeof d === "object" && d.prompt_id) || currentPrompt;
  if (executing !== null && executing !== id) settle(executing, promptId);
  executing = id;
  if (id === null) return;
  if (!ours(findNode(id))) return;
  const prev = runs.get(id);
  if (!prev || prev.promptId !== promptId || prev.status !== "running") {
    runs.set(id, { ...normalize({}), status: "starting", promptId });
    renderAll();
  }
}

// A node finished without a final event (older node, or one that sends none): close its run.
function settle(id, promptId) {
  const run = runs.get(id);
  if (!run) return;
  if (run.status === "starting") runs.delete(id);
  else if (run.status === "running" && (!promptId || run.promptId === promptId)) run.status = "done";
  else return;
  renderAll();
}

function onExecuted(ev) {
  const id = key(ev?.detail?.node);
  if (id !== null) settle(id, ev?.detail?.prompt_id);
}

function onEnd(ev, status) {
  const d = ev?.detail ?? {};
  const promptId = d.prompt_id ?? null;
  const nodeId = key(d.node_id);
  for (const [id, run] of runs) {
    if (run.status !== "running" && run.status !== "starting") continue;
    if (promptId && run.promptId && run.promptId !== promptId) continue;
    if (status === "done") { settle(id, promptId); continue; }
    if (status === "error" && nodeId !== null && nodeId !== id) { settle(id, promptId); continue; }
    run.status = status;
    if (!run.message) {
      const m = status === "error" ? String(d.exception_message ?? "").split("\n")[0].slice(0, 200) : "";
      run.message = m;
    }
  }
  executing = null;
  renderAll();
}

app.registerExtension({
  name: "DomainStudio.Progress",
  setup: safe(() => {
    api.addEventListener(EVENT, safe(onProgress));
    api.addEventListener("progress", safe(onStockProgress));
    api.addEventListener("execution_start", safe(onExecutionStart));
    api.addEventListener("executing", safe(onExecuting));
    api.addEventListener("executed", safe(onExecuted));
    api.addEventListener("execution_success", safe((ev) => onEnd(ev, "done")));
    api.addEventListener("execution_error", safe((ev) => onEnd(ev, "error")));
    api.addEventListener("execution_interrupted", safe((ev) => onEnd(ev, "cancelled")));
  }),
  nodeCreated: safe((node) => attach(node)),
  // Another workflow is loaded (or a tab switched): its nodes may reuse the ids of the nodes whose
  // finished runs we hold. Those are dropped so that no new node shows an old result; runs still in
  // progress stay (their next event would bring them back anyway).
  beforeConfigureGraph: safe(() => {
    for (const [id, run] of [...runs]) {
      if (run.status !== "running" && run.status !== "starting") runs.delete(id);
    }
  }),
});
