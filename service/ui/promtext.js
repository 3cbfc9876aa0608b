// The few numbers the live panel needs, read from the Prometheus text format of /metrics: the request
// counter and the request-duration histogram, summed over every model, version and protocol.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/;

function labelValue(labels, name) {
  const match = new RegExp(`(?:^|,)${name}="((?:[^"\\\\]|\\\\.)*)"`).exec(labels);
  return match ? match[1] : null;
}

/** {requests, buckets: Map(le -> cumulative count), count, sum} of inference requests. */
export function readRequests(text) {
  const result = { requests: 0, buckets: new Map(), count: 0, sum: 0 };
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const [, name, , labels = "", raw] = match;
    const value = Number(raw);
    if (name === "inference_requests_total") result.requests += value;
    else if (name === "inference_request_duration_seconds_count") result.count += value;
    else if (name === "inference_request_duration_seconds_sum") result.sum += value;
    else if (name === "inference_request_duration_seconds_bucket") {
      const le = labelValue(labels, "le");
      const bound = le === "+Inf" ? Infinity : Number(le);
      result.buckets.set(bound, (result.buckets.get(bound) ?? 0) + value);
    }
  }
  return result;
}

/** Bucket counts of `now` minus those of `before` (the requests between two readings). */
export function difference(now, before) {
  const buckets = new Map();
  for (const [bound, count] of now.buckets) buckets.set(bound, count - (before?.buckets.get(bound) ?? 0));
  return {
    requests: now.requests - (before?.requests ?? 0),
    buckets,
    count: now.count - (before?.count ?? 0),
    sum: now.sum - (before?.sum ?? 0),
  };
}

/** The q-quantile (seconds) of a cumulative histogram, interpolated inside its bucket as Prometheus's
 *  histogram_quantile does; null when it holds no observation. */
export function quantile(q, buckets) {
  const bounds = [...buckets.keys()].sort((a, b) => a - b);
  const total = bounds.length ? buckets.get(bounds[bounds.length - 1]) : 0;
  if (!total) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const bound of bounds) {
    const count = buckets.get(bound);
    if (count >= rank) {
      if (bound === Infinity) return lower;
      return lower + ((bound - lower) * (rank - below)) / Math.max(count - below, 1e-12);
    }
    lower = bound;
    below = count;
  }
  return lower;
}
