// A small client for the LoraDeploy HTTP API. The token lives in sessionStorage only.

const TOKEN_KEY = "loradeploy.token";

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answer from the server: `status`, the `{"error"}` message and 422 `detail` items. */
export class ApiError extends Error {
  constructor(status, message, detail = []) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

/** Sends a request; resolves to the parsed JSON, rejects with ApiError. */
export async function api(method, path, { body, auth = true } = {}) {
  const headers = { Accept: "application/json" };
  if (auth && getToken()) headers.Authorization = `Bearer ${getToken()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.");
  }
  noteServerClock(response);
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const detail = (Array.isArray(json?.detail) ? json.detail : []).map((d) => ({ ...d, msg: plain(d?.msg) }));
    const message =
      typeof json?.error === "string" ? plain(json.error)
      : detail.length ? detail.map((d) => d.msg).join("; ")
      : typeof json?.detail === "string" ? json.detail
      : `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, message, detail);
  }
  return json;
}

export const enc = encodeURIComponent;

// How far the server's clock is ahead of this browser's, from the Date header of its last answer (1 s resolution),
// so ages such as "last heartbeat 3 s ago" are measured on the server's clock, not a skewed local one.
let serverClockOffsetMs = 0;

function noteServerClock(response) {
  const date = Date.parse(response.headers.get("Date") ?? "");
  if (!Number.isNaN(date)) serverClockOffsetMs = date - Date.now();
}

/** The server's current time (ms since the epoch), as well as this browser can tell. */
export function serverNow() {
  return Date.now() + serverClockOffsetMs;
}

/** A message as a person reads it: without the "Value error, " prefix the API keeps for pydantic-shaped 422s. */
export function plain(text) {
  return String(text ?? "").replace(/^Value error, /, "");
}

/** The message of an error body (`{"error"}` or 422 `detail`), or the status line. */
function errorOf(response, text) {
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  const detail = (Array.isArray(json?.detail) ? json.detail : []).map((d) => ({ ...d, msg: plain(d?.msg) }));
  const message =
    typeof json?.error === "string" ? plain(json.error)
    : detail.length ? detail.map((d) => d.msg).join("; ")
    : `${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, message, detail);
}

/**
 * POSTs a JSON body and resolves to the Response once its headers are in, its body unread (a stream of server-sent
 * events, or JSON); rejects with ApiError on a non-2xx answer.
 */
export async function apiStream(path, body) {
  const headers = { Accept: "text/event-stream, application/json", "Content-Type": "application/json" };
  if (getToken()) headers.Authorization = `Bearer ${getToken()}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body), cache: "no-store" });
  } catch {
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.");
  }
  noteServerClock(response);
  if (!response.ok) throw errorOf(response, await response.text());
  return response;
}

/**
 * The server-sent events of a response body as `{ event, data }`, as the SSE rules read them: `:` comments skipped,
 * CR/LF/CRLF line ends, several `data:` lines joined with "\n".
 */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "", data = [], hasData = false;
  const dispatch = function* (line) {
    if (line === "") {
      if (hasData) yield { event: event || "message", data: data.join("\n") };
      event = ""; data = []; hasData = false;
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") { data.push(value); hasData = true; }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // A CR at the very end may be half of a CRLF: keep it for the next chunk.
    let match;
    const lineEnd = /\r\n|\r(?!$)|\n/g;
    let start = 0;
    while ((match = lineEnd.exec(buffer)) !== null) {
      yield* dispatch(buffer.slice(start, match.index));
      start = match.index + match[0].length;
    }
    buffer = buffer.slice(start);
  }
  if (buffer.endsWith("\r")) buffer = buffer.slice(0, -1);
  if (buffer !== "") yield* dispatch(buffer);
  yield* dispatch("");
}
