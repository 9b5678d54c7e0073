// sd's JSON API (/v1/sd/...), as any client would call it: the API token as a Bearer header, errors
// as the server words them, and a job's progress as Server-Sent Events read through fetch() (an
// EventSource cannot send the Authorization header).

const TOKEN_KEY = "sd.apiToken";

export class ApiError extends Error {
  // errors: [{field, message}] as the server sent them
  constructor(status, errors) {
    super(errors.map((e) => e.message).join("; "));
    this.status = status;
    this.errors = errors;
  }
}

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
};

function headers(extra = {}) {
  const all = { ...extra };
  const saved = token.get();
  if (saved) all.Authorization = `Bearer ${saved}`;
  return all;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const errors = JSON.parse(text).errors;
    if (Array.isArray(errors) && errors.length) return new ApiError(response.status, errors);
  } catch { /* not the API's JSON: say what came back */ }
  const message = `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
  return new ApiError(response.status, [{ field: null, message }]);
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, [{ field: null, message: `the server did not answer (${e.message}); is sd serve running?` }]);
  }
}

// GET or POST a JSON API route; resolves to the reply's JSON, rejects with an ApiError.
export async function call(method, path, { body, jobId, signal } = {}) {
  const extra = body === undefined ? {} : { "Content-Type": "application/json" };
  if (jobId) extra["X-Job-Id"] = jobId;
  const init = { method, headers: headers(extra), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await send(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// A job id of our own, so that its events can be followed before the generate request returns.
export function newJobId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Follow a job: resolves once the server has registered this follower (its response's headers are
// in), so that a generate request sent after it misses none of the job's events; then read them with
// events(). The server waits a while for a job id no request has named yet.
export async function follow(jobId, signal) {
  const response = await send(`/v1/sd/jobs/${encodeURIComponent(jobId)}/events`,
    { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// A followed job's events, {name, data}, until its last one (or until the follow's signal aborts).
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event) yield event;
    }
  }
}

// One SSE block: "event: NAME" and "data: JSON" lines; comment lines (":") keep the stream alive.
function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}
