// Many concurrent callers of one gateway, as a main app of many processes would be:
//   node load.mjs --callers 16 --updates 400 --work-orders 8 --dup-share 0.2 --retries 6
// Each update has its own request id; a share of them is sent twice (a scanner's repeat).
// Prints one JSON line: what was sent per work order (each request id once), and the answers.
import { parseArgs } from "node:util";
import { MesClient } from "./mes-client.mjs";

const { values } = parseArgs({
  options: {
    callers: { type: "string", default: "16" },
    updates: { type: "string", default: "400" },
    "work-orders": { type: "string", default: "8" },
    "dup-share": { type: "string", default: "0.2" },
    prefix: { type: "string", default: "node" },
    retries: { type: "string", default: "6" },
  },
});
const callers = Number(values.callers);
const updates = Number(values.updates);
const workOrders = Number(values["work-orders"]);
const dupShare = Number(values["dup-share"]);

const client = new MesClient({ baseUrl: process.env.MES_API_URL, token: process.env.MES_API_TOKEN,
                               retries: Number(values.retries) });
const plan = [];
for (let i = 0; i < updates; i += 1) {
  const update = { wo: `WO-N${i % workOrders}`, kind: i % 3 === 0 ? "input" : "output", qty: 1 + (i % 4),
                   requestId: `${values.prefix}:${i}` };
  plan.push(update);
  if ((i * 7919) % 1000 < dupShare * 1000) plan.push(update); // sent again, same request id
}

const expected = {};
for (const u of new Map(plan.map((u) => [u.requestId, u])).values()) {
  const key = `${u.wo}:${u.kind}`;
  expected[key] = (expected[key] ?? 0) + u.qty;
}
const codes = {};
let next = 0;
async function caller() {
  while (next < plan.length) {
    const u = plan[next++];
    const answer = await client.updateWorkOrderQuantity(u.wo, u.kind, u.qty, { source: "node" },
                                                        { requestId: u.requestId });
    codes[answer.code] = (codes[answer.code] ?? 0) + 1;
  }
}
await Promise.all(Array.from({ length: callers }, caller));
console.log(JSON.stringify({ sent: plan.length, unique: updates, expected, codes, resent: client.resent }));
