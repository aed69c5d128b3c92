// Follows one user's channel with phoenix.js while the Rust test publishes COUNT `newMessage` events
// ({n: 0..COUNT-1}) and breaks NATS underneath the gateway; checks that every event arrived exactly once,
// in order, on a socket that never had to reconnect or rejoin.
// Prints `ready <join response>` once joined, then `ok - …` / `not ok - …` per check and `N passed, M failed`;
// exits 0 only if every check passed.
// Env: GATEWAY_SOCKET_URL (ws://host:port/socket), TOKEN, USER_ID, COUNT, JOIN (`plain`: `{}`;
// `positions`: `{positions: true}`), WAIT_MS (how long the events may take in all).
import { Socket } from "phoenix";
import WebSocket from "ws";
import { check, env, isPosition, run, sequenceProblems, sleep, until } from "./checks.mjs";

const SETTLE_MS = 300; // quiet period after the last expected event, to catch duplicates and extras

const SOCKET_URL = env("GATEWAY_SOCKET_URL");
const TOKEN = env("TOKEN");
const USER_ID = env("USER_ID");
const COUNT = Number(env("COUNT"));
const JOIN = env("JOIN");
const WAIT_MS = Number(env("WAIT_MS"));

async function main() {
  const socket = new Socket(SOCKET_URL, { transport: WebSocket, params: { token: TOKEN }, timeout: 10000 });
  let opens = 0;
  socket.onOpen(() => opens++);
  socket.connect();

  const channel = socket.channel(`user:${USER_ID}`, JOIN === "positions" ? { positions: true } : {});
  const received = []; // {n, ref}
  let lastAt = null;
  channel.on("newMessage", (payload, ref) => {
    received.push({ n: payload.n, ref });
    lastAt = Date.now();
  });
  const joins = [];
  channel.join()
    .receive("ok", (response) => {
      joins.push({ status: "ok", response });
      if (joins.length === 1) console.log(`ready ${JSON.stringify(response)}`);
    })
    .receive("error", (response) => joins.push({ status: "error", response }))
    .receive("timeout", () => joins.push({ status: "timeout" }));
  if (!check("the join is answered", await until(() => joins.length > 0, 15000), `state ${socket.connectionState()}`)) return;
  const first = joins[0];
  if (JOIN === "positions") {
    check("join -> ok with a position that is not a decimal",
      first.status === "ok" && isPosition(first.response?.position), JSON.stringify(first));
  } else {
    check("join -> ok {}", first.status === "ok" && JSON.stringify(first.response) === "{}", JSON.stringify(first));
  }

  const started = Date.now();
  await until(() => received.length >= COUNT, WAIT_MS);
  const took = Date.now() - started;
  await sleep(SETTLE_MS);
  console.log(`# ${received.length} events received in ${took} ms`);
  console.log(`# last event at ${lastAt}`);

  const problems = sequenceProblems(received.map((e) => e.n), COUNT);
  check(`all ${COUNT} events, each once, in order`, problems.length === 0,
    `${received.length} received; ${problems.join("; ")}`);
  if (JOIN === "positions") {
    const refs = received.map((e) => e.ref);
    const bad = refs.filter((r) => !isPosition(r));
    check("every event carries a position that is not a decimal", bad.length === 0, JSON.stringify(bad.slice(0, 5)));
    check("positions are all different", new Set(refs).size === refs.length);
  } else {
    const bad = received.filter((e) => e.ref !== null);
    check("every event has a null ref", bad.length === 0, JSON.stringify(bad.slice(0, 5)));
  }
  check("the WebSocket stayed open: one connection, one join", opens === 1 && joins.length === 1,
    `${opens} connections, joins ${JSON.stringify(joins)}`);
  await new Promise((r) => socket.disconnect(r, 1000, "done"));
}

await run(main, WAIT_MS + 30000);
