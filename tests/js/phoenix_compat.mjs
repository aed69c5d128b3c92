// Compatibility test: replays the epochtalk-vue browser flow against epoch-gateway
// with the official phoenix.js client, publishing the server-side events on NATS.
// Usage: see README.md. Exit 0 only if every check passed.
import { Socket } from "phoenix";
import WebSocket from "ws";
import { connect, JSONCodec } from "nats";
import { isDeepStrictEqual, inspect } from "node:util";

const WAIT_MS = 3000; // every single wait
const SETTLE_MS = 300; // quiet period to catch duplicates / leaks
const HARD_TIMEOUT_MS = 60000;

function env(name) {
  const v = process.env[name];
  if (!v) { console.error(`missing environment variable ${name}`); process.exit(1); }
  return v;
}
const SOCKET_URL = env("GATEWAY_SOCKET_URL");
const NATS_URL = env("NATS_URL");
const PREFIX = env("SUBJECT_PREFIX");
const TOKEN = env("TOKEN");
const USER_ID = env("USER_ID");
const OTHER_USER_ID = env("OTHER_USER_ID");

let passed = 0, failed = 0;
function check(name, ok, details) {
  if (ok) { passed++; console.log(`ok - ${name}`); }
  else { failed++; console.log(`not ok - ${name}${details === undefined ? "" : ": " + details}`); }
  return ok;
}
const show = (v) => inspect(v, { depth: 5, breakLength: Infinity });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls cond() until true or WAIT_MS elapsed; resolves to the final cond() value.
async function until(cond, ms = WAIT_MS) {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(20);
  return cond();
}

// Result of a phoenix Push as {status: "ok"|"error"|"timeout", response}.
function pushResult(push) {
  return new Promise((resolve) => {
    for (const status of ["ok", "error", "timeout"]) push.receive(status, (response) => resolve({ status, response }));
  });
}

// Creates and joins a channel; every join reply (including automatic rejoins)
// is appended to ch.joins, every application event to ch.events.
function join(socket, topic) {
  const ch = socket.channel(topic);
  ch.joins = [];
  ch.events = [];
  ch.onMessage = (event, payload) => {
    if (!event.startsWith("phx_") && !event.startsWith("chan_reply_")) ch.events.push({ event, payload });
    return payload;
  };
  const push = ch.join();
  for (const status of ["ok", "error", "timeout"]) push.receive(status, (response) => ch.joins.push({ status, response }));
  return ch;
}
async function joinReply(ch, n = 1) {
  await until(() => ch.joins.length >= n);
  return ch.joins[n - 1] || { status: "no reply" };
}
function checkJoin(label, ch, reply, status, response) {
  const ok = reply.status === status && (response === undefined || isDeepStrictEqual(reply.response, response));
  return check(`${label}: join ${ch.topic} -> ${status}${response ? " " + show(response) : ""}`, ok, `got ${show(reply)}`);
}

const jc = JSONCodec();
let nc;
async function publish(suffix, event, payload) {
  nc.publish(`${PREFIX}.${suffix}`, jc.encode({ event, payload }));
  await nc.flush();
}

// Waits until every channel has received its expected events, then SETTLE_MS more,
// and checks each expected event arrived exactly once with its payload and nothing else came.
async function expectEvents(label, expected /* [[channel, event, payload], ...] */) {
  const count = (ch, ev) => ch.events.filter((e) => e.event === ev).length;
  await until(() => expected.every(([ch, ev]) => count(ch, ev) >= 1));
  await sleep(SETTLE_MS);
  for (const [ch, ev, payload] of expected) {
    const got = ch.events.filter((e) => e.event === ev);
    check(`${label}: ${ev} ${show(payload)} delivered once on ${ch.topic}`,
      got.length === 1 && isDeepStrictEqual(got[0].payload, payload),
      got.length === 0 ? "not received" : `received ${got.length}x: ${show(got.map((e) => e.payload))}`);
  }
  for (const ch of new Set(expected.map(([ch]) => ch))) {
    const extra = ch.events.filter((e) => !expected.some(([c, ev]) => c === ch && ev === e.event));
    check(`${label}: no unexpected events on ${ch.topic}`, extra.length === 0, show(extra));
  }
}

// Raw frames seen by the socket, to prove broadcasts for unjoined topics never reach it.
function expectNoFrames(label, socket, topic, event) {
  const leaked = socket.raw.filter((m) => m.topic === topic && m.event === event);
  check(`${label}: ${event} on ${topic} not sent to this socket`, leaked.length === 0, show(leaked));
}

async function main() {
  nc = await connect({ servers: NATS_URL }).catch((e) => {
    throw new Error(`cannot connect to NATS at ${NATS_URL}: ${e.message}`);
  });

  // Like epochtalk-vue: one Socket whose params follow the current token.
  let token = null;
  const socket = new Socket(SOCKET_URL, {
    transport: WebSocket, params: () => (token ? { token } : {}), timeout: WAIT_MS,
  });
  socket.raw = [];
  socket.onMessage((m) => socket.raw.push(m));
  let opens = 0;
  socket.onOpen(() => opens++);
  socket.connect();
  if (!check("a: anonymous socket connects", await until(() => opens === 1), `state ${socket.connectionState()}`)) {
    throw new Error(`no WebSocket connection to ${SOCKET_URL}/websocket, giving up`);
  }

  // a. anonymous public channel + announcement
  const pub = join(socket, "user:public");
  checkJoin("a", pub, await joinReply(pub), "ok");
  await publish("user.public", "announcement", { motd: "hello" });
  await expectEvents("a", [[pub, "announcement", { motd: "hello" }]]);

  // b. anonymous user:role is refused; leave so phoenix.js stops rejoining it
  const anonRole = join(socket, "user:role");
  checkJoin("b", anonRole, await joinReply(anonRole), "error",
    { reason: "unauthorized, cannot join 'user:role' channel" });
  await pushResult(anonRole.leave());
  await publish("user.role", "permissionsChanged", { lookup: "anon-leak" });
  await sleep(SETTLE_MS);
  expectNoFrames("b", socket, "user:role", "permissionsChanged");

  // c. log in: disconnect (code 1000 as epochtalk-vue does), set the token, reconnect.
  await new Promise((r) => socket.disconnect(r, 1000, "Disconnected to attempt authorized socket connection."));
  token = TOKEN;
  socket.connect();
  if (!check("c: socket reconnects with token", await until(() => opens === 2), `state ${socket.connectionState()}`)) {
    throw new Error("no WebSocket connection with the token, giving up");
  }
  pub.events = [];
  checkJoin("c", pub, await joinReply(pub, 2), "ok"); // automatic rejoin of the existing channel
  const role = join(socket, "user:role");
  const user = join(socket, `user:${USER_ID}`);
  checkJoin("c", role, await joinReply(role), "ok");
  checkJoin("c", user, await joinReply(user), "ok");

  // d. the six server-side events
  await publish("user.public", "announcement", { motd: "m2" });
  await publish("user.role", "permissionsChanged", { lookup: "user" });
  await publish(`user.${USER_ID}`, "reauthenticate", {});
  await publish(`user.${USER_ID}`, "logout", { token: "some_token" });
  await publish(`user.${USER_ID}`, "newMessage", {});
  await publish(`user.${USER_ID}`, "refreshMentions", {});
  await expectEvents("d", [
    [pub, "announcement", { motd: "m2" }],
    [role, "permissionsChanged", { lookup: "user" }],
    [user, "reauthenticate", {}],
    [user, "logout", { token: "some_token" }],
    [user, "newMessage", {}],
    [user, "refreshMentions", {}],
  ]);

  // e. is_online (self is recorded asynchronously after the public join: retry up to 2 s)
  let self;
  for (const end = Date.now() + 2000; ;) {
    self = await pushResult(pub.push("is_online", { user_id: Number(USER_ID) }));
    if (self.status !== "ok" || self.response.online !== false || Date.now() > end) break;
    await sleep(100);
  }
  const checkOnline = (label, r, expected) => check(`e: is_online ${label} -> ok ${show(expected)}`,
    r.status === "ok" && isDeepStrictEqual(r.response, expected), `got ${show(r)}`);
  const isOnline = (userId) => pushResult(pub.push("is_online", { user_id: userId }));
  checkOnline("self (number)", self, { id: Number(USER_ID), online: true });
  checkOnline("self (string)", await isOnline(String(USER_ID)), { id: String(USER_ID), online: true });
  checkOnline("other user", await isOnline(Number(OTHER_USER_ID)), { id: Number(OTHER_USER_ID), online: false });

  // f. another user's channel is refused, and its events never reach us
  const other = join(socket, `user:${OTHER_USER_ID}`);
  checkJoin("f", other, await joinReply(other), "error",
    { reason: `unauthorized, cannot join 'user:${OTHER_USER_ID}' channel` });
  await pushResult(other.leave());
  await publish(`user.${OTHER_USER_ID}`, "newMessage", {});
  await sleep(SETTLE_MS);
  expectNoFrames("f", socket, `user:${OTHER_USER_ID}`, "newMessage");

  // g. unknown event gets an error reply (not a timeout) and the channel stays joined
  const unknown = await pushResult(pub.push("no_such_event", {}));
  check("g: push no_such_event -> error with a string reason",
    unknown.status === "error" && typeof unknown.response?.reason === "string", `got ${show(unknown)}`);
  await sleep(SETTLE_MS);
  check("g: public channel still joined afterwards", pub.isJoined(), `state ${pub.state}`);

  // h. heartbeat (what phoenix.js sends every 30 s; a missing reply makes it reconnect)
  const hbRef = socket.makeRef();
  socket.push({ topic: "phoenix", event: "heartbeat", payload: {}, ref: hbRef });
  await until(() => socket.raw.some((m) => m.ref === hbRef));
  const hb = socket.raw.find((m) => m.ref === hbRef);
  check("h: heartbeat -> phx_reply ok on topic phoenix",
    hb && hb.topic === "phoenix" && hb.event === "phx_reply" && hb.payload.status === "ok", hb ? show(hb) : "no reply");

  await new Promise((r) => socket.disconnect(r, 1000, "done"));
}

const hard = setTimeout(() => {
  console.log(`not ok - hard timeout of ${HARD_TIMEOUT_MS / 1000} s reached`);
  process.exit(1);
}, HARD_TIMEOUT_MS);

try {
  await main();
} catch (err) {
  check("script ran to the end", false, err?.message || String(err));
}
if (nc) await nc.close().catch(() => {});
clearTimeout(hard);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
