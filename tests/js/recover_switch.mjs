// Recovery across instances with phoenix.js (CONTRACT §8): a socket follows `user:<id>` with join params
// as a function, `() => (last ? {since: last} : {positions: true})`, `last` being the position of the last
// event seen (the second argument of the event callback). While COUNT acked events ({n: 0..COUNT-1}) flow,
// the socket moves from instance A to instance B (disconnect, a new Socket and channel), then back to A
// through phoenix.js's own reconnect and rejoin (the connection is cut). Events are published while it is
// away each time. Expects `recovered: true` on both rejoins and every event exactly once, in order.
// Env: SOCKET_URL_A, SOCKET_URL_B (ws://host:port/socket), NATS_URL, SUBJECT_PREFIX, TOKEN, USER_ID, COUNT.
// Prints `ok - …` / `not ok - …` per check and `N passed, M failed`; exits 0 only if every check passed.
import { Socket } from "phoenix";
import WebSocket from "ws";
import { connect, JSONCodec } from "nats";
import { check, env, isPosition, run, sequenceProblems, sleep, until } from "./checks.mjs";

const URL_A = env("SOCKET_URL_A");
const URL_B = env("SOCKET_URL_B");
const NATS_URL = env("NATS_URL");
const PREFIX = env("SUBJECT_PREFIX");
const TOKEN = env("TOKEN");
const USER_ID = env("USER_ID");
const COUNT = Number(env("COUNT"));

const WAIT_MS = 15000; // every single wait
const PACE_MS = 4; // between two acked publishes
const AWAY_EVENTS = 20; // events published while the socket is on no instance, at least, on the first move
const RECONNECT_MS = 200; // phoenix.js's reconnect delay on the second move
const SETTLE_MS = 300;
const show = (v) => JSON.stringify(v);

async function main() {
  const nc = await connect({ servers: NATS_URL });
  const js = nc.jetstream();
  const jc = JSONCodec();
  const subject = `${PREFIX}.user.${USER_ID}`;
  const runId = Math.random().toString(36).slice(2);

  // The application's state: the last position seen, sent back on every join and rejoin.
  let last = null;
  const sent = []; // the join params, each time phoenix.js asked for them
  const params = () => {
    const p = last ? { since: last } : { positions: true };
    sent.push(p);
    return p;
  };
  const received = []; // {n, position}
  const joins = []; // {on, status, response}
  const instance = (socket) => (socket.endPoint.startsWith(URL_A) ? "A" : "B");

  function follow(socket) {
    const channel = socket.channel(`user:${USER_ID}`, params);
    channel.on("newMessage", (payload, position) => {
      received.push({ n: payload.n, position });
      last = position;
    });
    channel.join()
      .receive("ok", (response) => joins.push({ on: instance(socket), status: "ok", response }))
      .receive("error", (response) => joins.push({ on: instance(socket), status: "error", response }))
      .receive("timeout", () => joins.push({ on: instance(socket), status: "timeout" }));
    return channel;
  }

  // 1. On A, positions on.
  const onA = new Socket(URL_A, { transport: WebSocket, params: { token: TOKEN }, timeout: WAIT_MS });
  onA.connect();
  follow(onA);
  await until(() => joins.length >= 1, WAIT_MS);
  check("join on A -> ok with a position, no `recovered`",
    joins[0]?.status === "ok" && isPosition(joins[0].response.position) && !("recovered" in joins[0].response),
    show(joins[0]));

  let published = 0, retries = 0;
  const publishing = (async () => {
    for (let n = 0; n < COUNT; n++) {
      for (;;) {
        try {
          await js.publish(subject, jc.encode({ event: "newMessage", payload: { n } }),
            { msgID: `${runId}-${n}`, timeout: 2000 });
          break;
        } catch {
          retries++;
          await sleep(50);
        }
      }
      published = n + 1;
      await sleep(PACE_MS);
    }
  })();

  // 2. Move to B: disconnect, wait while events are published, connect a new Socket with a new channel.
  check("events arrive on A", await until(() => received.length >= COUNT / 3, WAIT_MS), `${received.length}`);
  await new Promise((r) => onA.disconnect(r, 1000, "moving"));
  const leftAt = published;
  await until(() => published >= leftAt + AWAY_EVENTS, WAIT_MS);
  const onB = new Socket(URL_B, {
    transport: WebSocket, params: { token: TOKEN }, timeout: WAIT_MS, reconnectAfterMs: () => RECONNECT_MS,
  });
  onB.connect();
  follow(onB);
  await until(() => joins.length >= 2, WAIT_MS);
  check("join on B with since -> ok, recovered: true, a position",
    joins[1]?.on === "B" && joins[1].status === "ok" && joins[1].response.recovered === true
      && isPosition(joins[1].response.position), show(joins[1]));
  check("events were published while the socket was away", published > leftAt, `${leftAt} -> ${published}`);

  // 3. Back to A through phoenix.js: the connection is cut, phoenix.js reconnects (now to A) and rejoins,
  // asking the params function again.
  check("events arrive on B", await until(() => received.length >= (2 * COUNT) / 3, WAIT_MS), `${received.length}`);
  onB.endPoint = `${URL_A}/websocket`;
  const cutAt = published;
  onB.conn.terminate();
  await until(() => joins.length >= 3, WAIT_MS);
  check("phoenix.js rejoins on A with since -> ok, recovered: true, a position",
    joins[2]?.on === "A" && joins[2].status === "ok" && joins[2].response.recovered === true
      && isPosition(joins[2].response.position), show(joins[2]));
  check("the rejoin sent the last position seen", sent.length === 3 && isPosition(sent[2].since), show(sent));
  check("events were published while the connection was cut", published > cutAt, `${cutAt} -> ${published}`);

  await publishing;
  await until(() => received.length >= COUNT, WAIT_MS);
  await sleep(SETTLE_MS);
  console.log(`# ${received.length} events received, ${retries} publish retries`);
  const problems = sequenceProblems(received.map((e) => e.n), COUNT);
  check(`all ${COUNT} events, each once, in order, across both moves`, problems.length === 0,
    `${received.length} received; ${problems.join("; ")}`);
  const positions = received.map((e) => e.position);
  check("every event carries a position that is not a decimal", positions.every(isPosition),
    show(positions.filter((p) => !isPosition(p)).slice(0, 5)));
  check("positions are all different", new Set(positions).size === positions.length);
  check("three joins in all", joins.length === 3, show(joins));

  await new Promise((r) => onB.disconnect(r, 1000, "done"));
  await nc.close();
}

await run(main, 60000);
