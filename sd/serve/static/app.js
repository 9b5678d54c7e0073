// The playground: a form for POST /v1/sd/generate, the job's progress from its event stream, and
// the results. Everything here goes through sd's public JSON API (api.js); see README, "Playground".

import { ApiError, call, events, follow, newJobId, token } from "./api.js";
import { Gallery } from "./gallery.js";
import { Mask, dataUrl } from "./mask.js";

const $ = (id) => document.getElementById(id);
const form = $("settings");
const NUMBERS = ["width", "height", "num_steps", "guidance", "num_images"];
const STREAM_GRACE_MS = 5000; // how long the last events may trail the generate reply

const state = {
  models: [],
  samplers: [],
  input: null, // {url: data URL, width, height}
  lastSeed: null,
  job: null, // the running job: {id, controller, cancelled}
};

// ---------------------------------------------------------------- the API token

let tokenAsked = null; // one dialog at a time, whichever request met the 401 first

function askToken(message) {
  if (tokenAsked) return tokenAsked;
  const dialog = $("token-dialog");
  $("token-message").textContent = message;
  $("token").value = "";
  dialog.returnValue = "";
  tokenAsked = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      tokenAsked = null;
      const value = $("token").value.trim();
      if (dialog.returnValue === "save" && value) {
        token.set(value);
        $("token-change").hidden = false;
        resolve();
      } else {
        reject(new ApiError(401, [{ field: null, message: `${message} (no token given)` }]));
      }
    }, { once: true });
  });
  dialog.showModal();
  return tokenAsked;
}

// Run an API call; on 401, ask for the token (saying what the server said) and try again.
async function authorized(request) {
  for (;;) {
    try {
      return await request();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) throw e;
      await askToken(e.message);
    }
  }
}

// ---------------------------------------------------------------- the catalogue and defaults

function option(value, text, disabled = false) {
  return Object.assign(document.createElement("option"), { value, textContent: text, disabled });
}

function describe(model) {
  const d = model.defaults;
  const needs = model.needs.length ? ` Needs: ${model.needs.join(" and ")}.` : "";
  return `${model.description}. Defaults: ${d.width}×${d.height}, ${d.num_steps} steps, guidance ${d.guidance}, ` +
    `${d.sampler}, ${d.schedule} schedule.${needs}`;
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function applyDefaults() {
  const model = currentModel();
  if (!model) return;
  const d = model.defaults;
  $("model-info").textContent = describe(model);
  for (const name of ["width", "height", "num_steps", "guidance", "sampler", "schedule"]) $(name).value = d[name];
  if (state.input) { // the picture's own size wins over the model's
    $("width").value = state.input.width;
    $("height").value = state.input.height;
  }
  $("strength").value = model.mode === "inpainting" ? d.inpaint_strength : d.strength;
  $("keep_unmasked").checked = d.keep_unmasked;
  showStrength();
  showSamplerOptions();
}

function showSamplerOptions() {
  const sampler = state.samplers.find((s) => s.name === $("sampler").value);
  const box = $("sampler-options");
  box.replaceChildren();
  $("sampler").title = sampler ? sampler.citation : "";
  for (const o of sampler ? sampler.options : []) {
    const id = `option-${o.name}`;
    const input = o.choices
      ? Object.assign(document.createElement("select"), { id })
      : Object.assign(document.createElement("input"), { id, type: "text", placeholder: String(o.default) });
    if (o.choices) input.append(option("", `${o.default} (default)`), ...o.choices.map((c) => option(c, c)));
    input.dataset.option = o.name;
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: o.name });
    const field = Object.assign(document.createElement("div"), { className: "field" });
    field.append(label, input);
    box.append(field);
  }
  $("sampler-options-box").hidden = !box.children.length;
}

async function loadCatalogue() {
  const [models, samplers, schedules] = await authorized(() => Promise.all([
    call("GET", "/v1/sd/models"), call("GET", "/v1/sd/samplers"), call("GET", "/v1/sd/schedules")]));
  state.models = models.models;
  state.samplers = samplers.samplers;
  $("model").replaceChildren(...state.models.map((m) =>
    option(m.id, `${m.id} (${m.mode}${m.present ? "" : `, ${m.state}`})`, !m.present)));
  $("sampler").replaceChildren(...state.samplers.map((s) => option(s.name, s.name)));
  $("schedule").replaceChildren(...schedules.schedules.map((s) => option(s.name, s.name)));
  for (const [select, list] of [[$("sampler"), state.samplers], [$("schedule"), schedules.schedules]]) {
    [...select.options].forEach((o, i) => { o.title = list[i].citation ?? list[i].description; });
  }
  const usable = state.models.find((m) => m.present);
  $("server-state").textContent = usable ? "" :
    "No model's weights are on this server yet: fetch one with sd download ID, or start sd serve with --model ID=FILE.";
  if (usable) $("model").value = usable.id;
  applyDefaults();
}

// ---------------------------------------------------------------- the input picture and its mask

const mask = new Mask($("mask"), showMaskState);

function showMaskState() {
  const share = mask.coverage();
  state.maskPainted = share > 0;
  $("mask-state").textContent = share > 0
    ? `Mask: ${Math.max(1, Math.round(share * 100))}% of the picture will be repainted (inpainting).`
    : "No mask painted: the whole picture is redrawn (image to image). Paint over a part to repaint only that.";
}

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
  $("brush-size").textContent = `${$("brush").value} px`;
}

async function setInput(blob) {
  const url = await dataUrl(blob);
  const picture = $("input-image");
  picture.src = url;
  await picture.decode();
  const { naturalWidth: width, naturalHeight: height } = picture;
  state.input = { url, width: Math.max(8, width - (width % 8)), height: Math.max(8, height - (height % 8)) };
  mask.reset(width, height);
  $("brush").max = Math.max(16, Math.round(Math.max(width, height) / 2));
  $("brush").value = Math.max(2, Math.round(Math.min(width, height) / 10));
  mask.brush = Number($("brush").value);
  $("width").value = state.input.width;
  $("height").value = state.input.height;
  $("input-tools").hidden = false;
  showStrength();
}

function removeInput() {
  state.input = null;
  $("input-image").removeAttribute("src");
  $("input-tools").hidden = true;
  $("image-file").value = "";
  mask.reset(0, 0);
  applyDefaults();
}

function wireInput() {
  $("image-file").addEventListener("change", (e) => e.target.files[0] && setInput(e.target.files[0]).catch(fail));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) setInput(file).catch(fail);
  });
  $("brush").addEventListener("input", () => { mask.brush = Number($("brush").value); showStrength(); });
  $("strength").addEventListener("input", showStrength);
  $("erase").addEventListener("change", () => { mask.erase = $("erase").checked; });
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("mask-invert").addEventListener("click", () => mask.invert());
  $("image-remove").addEventListener("click", removeInput);
}

// ---------------------------------------------------------------- the request

function seedMode() {
  return form.elements["seed-mode"].value;
}

function showSeedMode() {
  const mode = seedMode();
  $("seed").disabled = mode !== "fixed";
  if (mode === "last") $("seed").value = state.lastSeed ?? "";
}

// The generate request's body; fields left empty are left out (the model's defaults apply).
async function body() {
  const out = { model: $("model").value, prompt: $("prompt").value };
  if ($("negative_prompt").value) out.negative_prompt = $("negative_prompt").value;
  for (const name of NUMBERS) {
    const text = $(name).value.trim();
    if (text !== "") out[name] = Number(text);
  }
  out.sampler = $("sampler").value;
  out.schedule = $("schedule").value;
  const seed = seedMode() === "fixed" ? $("seed").value.trim() : seedMode() === "last" ? state.lastSeed : null;
  if (seed !== null && seed !== "") out.seed = Number(seed);
  const options = {};
  for (const input of $("sampler-options").querySelectorAll("[data-option]")) {
    const text = input.value.trim();
    if (text !== "") options[input.dataset.option] = isNaN(Number(text)) ? text : Number(text);
  }
  if (Object.keys(options).length) out.sampler_options = options;
  if (state.input) {
    out.image = state.input.url;
    out.strength = Number($("strength").value);
    if (state.maskPainted) {
      out.mask = await mask.png();
      out.keep_unmasked = $("keep_unmasked").checked;
    }
  }
  return out;
}

// ---------------------------------------------------------------- progress, errors, results

function progress(step, steps, text) {
  const bar = $("progress");
  bar.setAttribute("max", String(Math.max(1, steps)));
  bar.setAttribute("value", String(step));
  $("progress-label").textContent = text;
}

function clearErrors() {
  $("errors").hidden = true;
  $("errors").replaceChildren();
  for (const field of form.querySelectorAll("[aria-invalid]")) {
    field.removeAttribute("aria-invalid");
    field.removeAttribute("aria-describedby");
  }
}

// Show the server's errors as it worded them; an input it names is marked.
function fail(error) {
  if (error.name === "AbortError") return;
  const errors = error instanceof ApiError ? error.errors : [{ field: null, message: String(error.message || error) }];
  const list = document.createElement("ul");
  for (const e of errors) {
    list.append(Object.assign(document.createElement("li"), { textContent: e.message }));
    const input = e.field && form.elements[e.field];
    if (input instanceof HTMLElement) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", "errors");
    }
  }
  const title = error instanceof ApiError && error.status
    ? `The server answered ${error.status}:` : "Something went wrong:";
  $("errors").replaceChildren(Object.assign(document.createElement("p"), { textContent: title }), list);
  $("errors").hidden = false;
}

const gallery = new Gallery($("gallery"), $("gallery-empty"), {
  useAsInput: (blob) => setInput(blob).then(() => $("input").scrollIntoView({ behavior: "smooth" })).catch(fail),
  reuse: reuseSettings,
});

function reuseSettings(settings) {
  if (settings.model && state.models.some((m) => m.id === settings.model && m.present)) {
    $("model").value = settings.model;
    applyDefaults();
  }
  for (const name of ["prompt", "width", "height", "num_steps", "guidance", "sampler", "schedule"]) {
    if (settings[name] !== undefined && settings[name] !== null) $(name).value = settings[name];
  }
  $("negative_prompt").value = settings.negative_prompt ?? "";
  if (settings.strength !== undefined) $("strength").value = settings.strength;
  if (settings.seed !== undefined) {
    form.querySelector('input[name="seed-mode"][value="fixed"]').checked = true;
    $("seed").value = settings.seed;
    showSeedMode();
  }
  showStrength();
  showSamplerOptions();
  $("prompt").focus();
}

// ---------------------------------------------------------------- a generation

// Show a followed job's progress until its last event.
async function show(stream) {
  try {
    for await (const { name, data } of events(stream)) {
      if (name === "queued") progress(0, 1, data.position > 1 ? `Queued: ${data.position - 1} ahead of it.` : "Queued: next.");
      else if (name === "running") progress(0, 1, "Running: loading the model…");
      else if (name === "progress") {
        progress(data.step, data.steps, `Step ${data.step}/${data.steps}`);
        if (data.preview) Object.assign($("live"), { src: `data:image/png;base64,${data.preview}`, hidden: false });
      } else if (name === "stopped") {
        progress(data.step, data.steps || 1, data.steps ? `Stopped at step ${data.step}/${data.steps}.` : "Stopped before it began.");
      }
    }
  } catch (e) {
    // the generate reply is what counts: a stream that breaks only costs the live progress
    if (e.name !== "AbortError") console.warn("progress stream:", e.message);
  }
}

async function generate() {
  if (state.job) return;
  clearErrors();
  let request;
  try {
    request = await body();
  } catch (e) {
    return fail(e);
  }
  const job = state.job = { id: newJobId(), controller: new AbortController(), cancelled: false, posted: false };
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("live").hidden = true;
  progress(0, 1, "Sending…");
  let following = Promise.resolve();
  try {
    // follow first, so that no step goes unseen; a stream that will not open only costs the live progress
    const stream = await authorized(() => follow(job.id, job.controller.signal)).catch((e) => {
      if (e.name === "AbortError" || e.status === 401) throw e;
      console.warn("progress stream:", e.message);
    });
    if (stream) following = show(stream);
    job.posted = true;
    const reply = await authorized(() => call("POST", "/v1/sd/generate", { body: request, jobId: job.id }));
    await Promise.race([following, new Promise((done) => setTimeout(done, STREAM_GRACE_MS))]);
    // newest first, a batch in its own order; each shown with the settings its PNG carries
    const seeds = [...reply.images].reverse().map((image) => gallery.add(image.png).seed).reverse();
    state.lastSeed = seeds[0] ?? state.lastSeed;
    showSeedMode();
    const n = seeds.length;
    const which = n === 1 ? `seed ${seeds[0]}` : `seeds ${seeds.join(", ")}`;
    progress(1, 1, `Done: ${n} image${n === 1 ? "" : "s"} in ${reply.seconds.toFixed(1)} s (${which}).`);
  } catch (e) {
    if (job.cancelled && e.name === "AbortError") {
      progress(0, 1, "Cancelled before it was sent.");
    } else if (!(job.cancelled && e instanceof ApiError && e.status === 409)) { // 409: the cancel's own answer
      progress(0, 1, "Failed.");
      fail(e);
    }
    await Promise.race([following, new Promise((done) => setTimeout(done, STREAM_GRACE_MS))]);
  } finally {
    job.controller.abort();
    state.job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  const job = state.job;
  if (!job || job.cancelled) return;
  job.cancelled = true;
  $("cancel").disabled = true;
  if (!job.posted) return job.controller.abort(); // nothing sent yet: nothing to stop on the server
  $("progress-label").textContent = "Cancelling…";
  try {
    await authorized(() => call("POST", `/v1/sd/jobs/${encodeURIComponent(job.id)}/cancel`));
  } catch (e) {
    job.cancelled = false;
    fail(e);
  }
}

// ---------------------------------------------------------------- wiring

function main() {
  wireInput();
  $("model").addEventListener("change", applyDefaults);
  $("sampler").addEventListener("change", showSamplerOptions);
  for (const radio of form.elements["seed-mode"]) radio.addEventListener("change", showSeedMode);
  form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
  $("token-change").hidden = !token.get();
  $("token-change").addEventListener("click", () => askToken("Enter this server's API token.").catch(() => {}));
  showMaskState();
  showStrength();
  loadCatalogue().catch(fail);
}

main();
