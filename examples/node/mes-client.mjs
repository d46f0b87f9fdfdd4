// A mes_tasks client for a Node.js main app, written as the reference services' main app
// forwards its updates: the built-in fetch only, no dependency.
//
//   import { MesClient } from "./mes-client.mjs";
//   const mes = new MesClient({ baseUrl: process.env.MES_API_URL, token: process.env.MES_API_TOKEN });
//   const result = await mes.updateWorkOrderQuantity("WO-1001", "output", 1, { barcode: "BC123" },
//                                                    { requestId: "scan:BC123:PACK" });
//   // { success: true, code: "QUEUED" | "SPOOLED" | "DUPLICATE", job_id, request_id, ... }
//
// Every call carries an Idempotency-Key (the request id; a new UUID when none is given), and
// a call that fails on the network, times out, or answers 502/503/504 is sent again with the
// same key (up to `retries` times, waiting twice as long each time up to `maxBackoffMs`, or
// what Retry-After says): the update counts once however often it is sent. Other answers (a 4xx refusal,
// a 2xx result) come back as the gateway's result dict, never as an exception.

import { randomUUID } from "node:crypto";

const RETRYABLE = new Set([502, 503, 504]);

export class MesClient {
  constructor({ baseUrl, token, timeoutMs = 5000, retries = 6, backoffMs = 100, maxBackoffMs = 2000 } = {}) {
    if (!baseUrl || !token) throw new Error("MesClient needs baseUrl and token (MES_API_URL, MES_API_TOKEN)");
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.token = token;
    this.timeoutMs = timeoutMs;
    this.retries = retries;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.resent = 0; // calls sent again after a failure, for the curious
  }

  // One update. type: "input" | "output"; quantity: a non-zero integer (negative: a correction).
  async updateWorkOrderQuantity(workOrderId, type, quantity, context = {}, { requestId } = {}) {
    const key = requestId ?? randomUUID();
    const body = { work_order_id: workOrderId, kind: type, quantity, context };
    return this.#send("POST", "/api/workorder/update-quantity", body, { "Idempotency-Key": key });
  }

  // A batch: [{ work_order_id, kind, quantity, request_id?, context? }, ...]; one result per item.
  async batchUpdateQuantity(updates) {
    return this.#send("POST", "/api/workorder/batch-update-quantity", { updates });
  }

  // Where one update is: pending, applied, duplicate, dead_lettered or unknown.
  async updateStatus(requestId) {
    return this.#send("GET", `/api/updates/${encodeURIComponent(requestId)}`);
  }

  async workOrder(workOrderId) {
    return this.#send("GET", `/api/workorder/${encodeURIComponent(workOrderId)}`);
  }

  async #send(method, path, body, headers = {}) {
    let last = null;
    for (let attempt = 0; attempt <= this.retries; attempt += 1) {
      if (attempt > 0) {
        this.resent += 1;
        await sleep(last?.retryAfterMs ?? Math.min(this.maxBackoffMs, this.backoffMs * 2 ** (attempt - 1)));
      }
      try {
        const response = await fetch(this.baseUrl + path, {
          method,
          headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json", ...headers },
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(this.timeoutMs),
        });
        const answer = await response.json();
        if (!RETRYABLE.has(response.status)) return answer;
        last = { answer, retryAfterMs: 1000 * Number(response.headers.get("retry-after") || 0) || null };
      } catch (error) {
        last = { answer: { success: false, code: "NETWORK_ERROR", error: String(error?.cause ?? error) } };
      }
    }
    return last.answer;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
