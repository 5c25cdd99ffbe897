// ComfyUI-DomainStudio frontend: shows training progress (step X / Y, elapsed, ETA) in the title bar
// of DomainStudio_* nodes. Defensive by design: missing fields or APIs are ignored, never thrown.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "DomainStudio_";
const CANCEL_MS = 4000;
const state = new Map(); // node id (string) -> { value, max, start, promptId, text?, until? }
let executing = null; // id of the node ComfyUI reports as executing (progress may omit `node`)
let ticker = null;

const key = (id) => (id === null || id === undefined ? null : String(id));

function fmt(sec) {
  if (!Number.isFinite(sec) || sec < 0) return "?";
  sec = Math.round(sec);
  const h = Math.floor(sec / 3600), m = Math.floor((sec % 3600) / 60), s = sec % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function findNode(id) {
  try {
    const g = app?.graph;
    if (!g || id === null) return null;
    return g.getNodeById?.(id) ?? g.getNodeById?.(Number(id)) ?? null;
  } catch { return null; }
}

const ours = (node) => String(node?.comfyClass ?? node?.type ?? "").startsWith(PREFIX);

function redraw() {
  try { app?.graph?.setDirtyCanvas?.(true, false); } catch { /* ignore */ }
  if (state.size && !ticker) ticker = setInterval(redraw, 1000); // keep "elapsed" ticking
  if (!state.size && ticker) { clearInterval(ticker); ticker = null; }
}

function progressText(s, now = Date.now()) {
  if (!s) return "";
  if (s.text) return s.text;
  const value = Number(s.value) || 0, max = Number(s.max) || 0;
  const elapsed = (now - s.start) / 1000;
  let out = max > 0 ? `training: step ${value} / ${max}` : `training: step ${value}`;
  out += `  ${fmt(elapsed)}`;
  if (max > 0 && value > 0 && value < max) out += `  ETA ${fmt((elapsed / value) * (max - value))}`;
  return out;
}

function onProgress(ev) {
  const d = ev?.detail ?? {};
  const id = key(d.node ?? executing);
  if (id === null || !ours(findNode(id))) return;
  const prev = state.get(id);
  const value = Number(d.value) || 0;
  const fresh = !prev || prev.text || prev.promptId !== d.prompt_id || value < prev.value;
  state.set(id, { value, max: Number(d.max) || 0, promptId: d.prompt_id, start: fresh ? Date.now() : prev.start });
  redraw();
}

function clear(ev, text) {
  const d = ev?.detail ?? {};
  const id = key(d.node ?? d.node_id);
  const ids = id !== null && state.has(id) ? [id] : id === null ? [...state.keys()] : [];
  for (const k of ids) {
    if (text) {
      const until = Date.now() + CANCEL_MS;
      state.set(k, { text, until });
      setTimeout(() => { if (state.get(k)?.until === until) { state.delete(k); redraw(); } }, CANCEL_MS);
    } else state.delete(k);
  }
  redraw();
}

app.registerExtension({
  name: "DomainStudio.Progress",
  setup() {
    try {
      api.addEventListener("progress", onProgress);
      api.addEventListener("executing", (ev) => {
        const d = ev?.detail;
        const next = key(d && typeof d === "object" ? d.node : d);
        // A node without UI output sends no "executed": moving on to another node also ends it.
        if (executing !== null && next !== executing && state.has(executing) && !state.get(executing).text) {
          state.delete(executing);
          redraw();
        }
        executing = next;
      });
      api.addEventListener("executed", (ev) => clear(ev));
      api.addEventListener("execution_error", (ev) => clear(ev));
      api.addEventListener("execution_success", () => clear({ detail: {} }));
      api.addEventListener("execution_interrupted", (ev) => clear(ev, "cancelled"));
    } catch (e) { console.warn("[DomainStudio] progress display disabled:", e); }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith(PREFIX) || !nodeType?.prototype) return;
    const orig = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const r = orig?.apply(this, [ctx, ...rest]);
      try {
        const text = progressText(state.get(key(this.id)));
        if (!text || !ctx || this.flags?.collapsed) return r;
        const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        const w = Number(this.size?.[0]) || 200;
        ctx.save();
        ctx.font = "11px sans-serif";
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillStyle = state.get(key(this.id))?.text ? "#f88" : "#8cf";
        ctx.fillText(text, w - 8, -titleH / 2);
        ctx.restore();
      } catch { /* never break canvas drawing */ }
      return r;
    };
  },
});
