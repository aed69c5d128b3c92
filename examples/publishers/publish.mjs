// A backend service's publish that loses nothing, with the `nats` npm package (nats.js 2.x).
//
//   node examples/publishers/publish.mjs nats://127.0.0.1:4222 epoch.user.42 newMessage '{"id":1}'
//
// (after `scripts/setup.sh`, which installs this directory's package.json).
//
// The event is published with JetStream, so the server answers with an ack once the stream has stored
// it. The `Nats-Msg-Id` header (`msgID`) names this one event: when an ack does not come (a failover, a
// reconnect), the same message is sent again with the same id, and the stream drops the copy it already
// holds. Without an ack there is no way to know whether the event was stored.
import { randomUUID } from "node:crypto";
import { connect } from "nats";

// Past this deadline the event is reported as not stored.
const DEADLINE_MS = 10_000;
// How long each attempt waits for its ack.
const ACK_TIMEOUT_MS = 2_000;

const [url, subject, event, payloadJson = "{}"] = process.argv.slice(2);
if (!url || !subject || !event) {
  console.error("usage: publish.mjs <NATS_URL> <SUBJECT> <EVENT> [PAYLOAD_JSON]");
  process.exit(2);
}
const payload = JSON.parse(payloadJson);
if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
  console.error("the payload must be a JSON object");
  process.exit(2);
}
const body = new TextEncoder().encode(JSON.stringify({ event, payload }));

const nc = await connect({ servers: url });
const js = nc.jetstream();

// One id per event, chosen once, before the first attempt.
const msgID = randomUUID();
const started = Date.now();
let code = 0;
for (;;) {
  try {
    const ack = await js.publish(subject, body, { msgID, timeout: ACK_TIMEOUT_MS });
    console.log(`stored in ${ack.stream} at ${ack.seq}`);
    break;
  } catch (error) {
    if (Date.now() - started >= DEADLINE_MS) {
      console.error(`not stored: ${error.message}`);
      code = 1;
      break;
    }
    console.error(`not acked yet (${error.message}); sending ${msgID} again`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}
await nc.close();
process.exit(code);
