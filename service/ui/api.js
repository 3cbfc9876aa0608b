// The server's public API, as any client calls it: v2 metadata and infer (Triton's binary extension),
// TorchServe-style /explanations, and the Prometheus text of /metrics. Errors become ApiError with the
// server's own message, so the page shows what the API said, never a blank.

export const TOKEN_KEY = "imgclf_token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The inference token this tab was given (sign-in page), else the cookie it left; "" when none. */
export function token() {
  const stored = sessionStorage.getItem(TOKEN_KEY);
  if (stored) return stored;
  const cookie = document.cookie.split("; ").find((item) => item.startsWith(TOKEN_KEY + "="));
  return cookie ? decodeURIComponent(cookie.slice(TOKEN_KEY.length + 1)) : "";
}

function headers(extra = {}) {
  const value = token();
  return value ? { ...extra, Authorization: "Bearer " + value } : extra;
}

/** The message of an error answer: v2's {"error"}, TorchServe's {"message"}, else the status and body. */
async function failure(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const message = body.error ?? body.message;
    if (typeof message === "string") return new ApiError(response.status, message);
  } catch {
    // not JSON: fall through to the raw text
  }
  const detail = text.trim().slice(0, 300) || response.statusText;
  return new ApiError(response.status, `HTTP ${response.status}: ${detail}`);
}

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers), cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, `the server did not answer (${error.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

const part = encodeURIComponent;

export async function modelNames() {
  const body = await (await call("/v2/models")).json();
  return body.models;
}

export async function metadata(model, version) {
  const path = version === undefined ? `/v2/models/${part(model)}` : `/v2/models/${part(model)}/versions/${part(version)}`;
  return (await call(path)).json();
}

/** v2 infer of one encoded image as a BYTES tensor in the binary extension (no base64): the first
 *  `count` answers of the model's task as Triton's classification strings "score:index:label". */
export async function classify(model, version, bytes, count) {
  const header = {
    inputs: [{ name: "image", datatype: "BYTES", shape: [1], parameters: { binary_data_size: 4 + bytes.byteLength } }],
    outputs: [{ name: "probabilities", parameters: { classification: count } }],
  };
  const json = new TextEncoder().encode(JSON.stringify(header));
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, bytes.byteLength, true);
  const body = new Blob([json, length, bytes]);
  const response = await call(`/v2/models/${part(model)}/versions/${part(version)}/infer`, {
    method: "POST",
    body,
    headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(json.length) },
  });
  const answer = await response.json();
  return answer.outputs.find((output) => output.name === "probabilities").data;
}

/** The Grad-CAM heatmap of the image's first answer: a grayscale PNG blob at the model's input size. */
export async function explanation(model, version, bytes) {
  const response = await call(`/explanations/${part(model)}/${part(version)}`, {
    method: "POST",
    body: bytes,
    headers: { "Content-Type": "application/octet-stream" },
  });
  return response.blob();
}

/** The Prometheus text of /metrics, or null when this port does not serve it (--metrics-port). */
export async function metricsText() {
  const response = await fetch("/metrics", { cache: "no-store" });
  if (response.status === 404) return null;
  if (!response.ok) throw await failure(response);
  return response.text();
}

/** Split a classification string "score:index:label" (the label may hold ':'); null for padding (""). */
export function parseAnswer(text) {
  if (!text) return null;
  const first = text.indexOf(":");
  const second = text.indexOf(":", first + 1);
  return { score: text.slice(0, first), index: Number(text.slice(first + 1, second)), label: text.slice(second + 1) };
}
