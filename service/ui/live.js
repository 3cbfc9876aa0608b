// The live panel: request rate and latency p50/p99 between two readings of the server's own /metrics.

import { metricsText } from "./api.js";
import { byId } from "./dom.js";
import { difference, quantile, readRequests } from "./promtext.js";

const PERIOD_MS = 2000;

function milliseconds(seconds) {
  if (seconds === null) return "–";
  return seconds < 0.01 ? `${(seconds * 1000).toFixed(2)} ms` : `${(seconds * 1000).toFixed(1)} ms`;
}

function render(now, before, elapsedS) {
  const recent = difference(now, before);
  byId("total").textContent = String(now.requests);
  if (before) byId("rate").textContent = (recent.requests / elapsedS).toFixed(2);
  // the first reading, or no request since the last one: the quantiles since the server started
  const buckets = before && recent.count > 0 ? recent.buckets : now.buckets;
  byId("p50").textContent = milliseconds(quantile(0.5, buckets));
  byId("p99").textContent = milliseconds(quantile(0.99, buckets));
}

/** Read /metrics now and every PERIOD_MS; say so once when this port does not serve it. */
export function startLivePanel() {
  let before = null;
  let at = 0;
  const tick = async () => {
    try {
      const text = await metricsText();
      if (text === null) {
        byId("live-note").textContent = "This server serves /metrics on its own port (--metrics-port).";
        return; // nothing to poll here
      }
      const now = readRequests(text);
      const time = performance.now();
      render(now, before, (time - at) / 1000);
      before = now;
      at = time;
    } catch (error) {
      byId("live-note").textContent = `Reading /metrics failed: ${error.message}`;
    }
    setTimeout(tick, PERIOD_MS);
  };
  tick();
}
