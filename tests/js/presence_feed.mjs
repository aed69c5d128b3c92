// The presence feed with phoenix.js's own `Presence` class, across two instances A and B of one cluster.
//
// A watcher on A (user WATCHER_ID) joins `user:public` with {presence: true} and keeps a `Presence` list;
// a second watcher on B does the same. Then:
//   1. across instances: a user joins on B, the watcher on A lists it, and the list agrees with is_online;
//   2. batching: BATCH users join on B at once and reach the watcher in at most two diffs;
//   3. rejoin: the watcher's connection is cut, phoenix.js reconnects and rejoins, and the fresh
//      presence_state does not double the list (same users, one meta each);
//   4. crash: the script prints `kill B` and waits; the test SIGKILLs instance B, and every user of B leaves
//      the watcher's list within TTL_SECS + 2 s, while the watcher itself stays.
// Env: SOCKET_URL_A, SOCKET_URL_B (ws://host:port/socket), TOKENS (JSON: user id → token), WATCHER_ID,
// B_WATCHER_ID, B_USER_ID, BATCH_IDS (comma-separated), TTL_SECS.
// Prints `ok - …` / `not ok - …` per check and `N passed, M failed`; exits 0 only if every check passed.
import { Presence, Socket } from "phoenix";
import WebSocket from "ws";
import { check, env, run, sleep, until } from "./checks.mjs";

const URL_A = env("SOCKET_URL_A");
const URL_B = env("SOCKET_URL_B");
const TOKENS = JSON.parse(env("TOKENS"));
const WATCHER_ID = env("WATCHER_ID");
const B_WATCHER_ID = env("B_WATCHER_ID");
const B_USER_ID = env("B_USER_ID");
const BATCH_IDS = env("BATCH_IDS").split(",");
const TTL_MS = Number(env("TTL_SECS")) * 1000;

const WAIT_MS = 8000; // a change reaching a watcher on another instance: KV watch + one feed interval
const show = (v) => JSON.stringify(v);

function connect(url, user) {
  const socket = new Socket(url, {
    transport: WebSocket,
    params: { token: TOKENS[user] },
    reconnectAfterMs: () => 100,
    rejoinAfterMs: () => 100,
  });
  socket.connect();
  return socket;
}

function join(channel) {
  return new Promise((resolve) => {
    channel.join()
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => resolve({ status: "timeout" }));
  });
}

function push(channel, event, payload) {
  return new Promise((resolve) => {
    channel.push(event, payload)
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => resolve({ status: "timeout" }));
  });
}

// A socket of `user` on `url` with `user:public` joined, and the feed when `feed` is set.
async function online(url, user, feed) {
  const socket = connect(url, user);
  const channel = socket.channel("user:public", feed ? { presence: true } : {});
  const watcher = { socket, channel, diffs: [], states: 0 };
  if (feed) {
    watcher.presence = new Presence(channel);
    channel.on("presence_diff", (diff) => watcher.diffs.push(diff));
    channel.on("presence_state", () => watcher.states++);
  }
  watcher.joined = await join(channel);
  return watcher;
}

const listed = (watcher) => watcher.presence.list((id, { metas }) => ({ id, metas: metas.length }));
const ids = (watcher) => listed(watcher).map((p) => p.id).sort();
const has = (watcher, id) => ids(watcher).includes(String(id));

async function main() {
  const a = await online(URL_A, WATCHER_ID, true);
  check("the watcher on A joins user:public with the feed", a.joined.status === "ok", show(a.joined));
  const b = await online(URL_B, B_WATCHER_ID, true);
  check("the watcher on B joins user:public with the feed", b.joined.status === "ok", show(b.joined));
  check("a presence_state follows each join", await until(() => a.states === 1 && b.states === 1, WAIT_MS),
    `A ${a.states}, B ${b.states}`);
  check("each watcher lists itself and the other",
    await until(() => [a, b].every((w) => has(w, WATCHER_ID) && has(w, B_WATCHER_ID)), WAIT_MS),
    `A ${show(ids(a))}, B ${show(ids(b))}`);

  // 1. Across instances, and as is_online answers.
  const user = await online(URL_B, B_USER_ID, false);
  check(`user ${B_USER_ID} joins on B`, user.joined.status === "ok", show(user.joined));
  check(`the watcher on A lists user ${B_USER_ID} of B`, await until(() => has(a, B_USER_ID), WAIT_MS),
    show(ids(a)));
  const asked = [WATCHER_ID, B_WATCHER_ID, B_USER_ID, BATCH_IDS[0]];
  const answers = await Promise.all(asked.map((id) => push(a.channel, "is_online", { user_id: Number(id) })));
  const agree = asked.every((id, i) => answers[i].status === "ok" && answers[i].response.online === has(a, id));
  check("the list agrees with is_online", agree, `${show(ids(a))} vs ${show(answers)}`);

  // 2. Batching: many joins within one interval arrive as one diff (two if they straddle a tick).
  const before = a.diffs.length;
  const batch = await Promise.all(BATCH_IDS.map((id) => online(URL_B, id, false)));
  check(`${BATCH_IDS.length} users join on B at once`, batch.every((s) => s.joined.status === "ok"));
  check("the watcher on A lists all of them", await until(() => BATCH_IDS.every((id) => has(a, id)), WAIT_MS),
    show(ids(a)));
  const carrying = a.diffs.slice(before).filter((d) => BATCH_IDS.some((id) => d.joins[id]));
  check(`the ${BATCH_IDS.length} joins arrive in at most 2 diffs`, carrying.length >= 1 && carrying.length <= 2,
    `${carrying.length} diffs`);
  check("every diff holds joins and leaves", a.diffs.every((d) => d.joins && d.leaves), show(a.diffs));

  // 3. A rejoin after a reconnect: a fresh presence_state, and the same list, not doubled.
  const everyone = [WATCHER_ID, B_WATCHER_ID, B_USER_ID, ...BATCH_IDS].sort();
  await sleep(1500); // no change in flight
  const beforeRejoin = show(listed(a).sort((x, y) => x.id.localeCompare(y.id)));
  a.socket.conn.close(); // not socket.disconnect(): phoenix.js reconnects and rejoins on its own
  check("phoenix.js rejoins and gets a fresh presence_state", await until(() => a.states === 2, WAIT_MS),
    `${a.states} states`);
  await sleep(1500);
  const afterRejoin = show(listed(a).sort((x, y) => x.id.localeCompare(y.id)));
  check("the rejoin does not double the list", afterRejoin === beforeRejoin, `${beforeRejoin} → ${afterRejoin}`);
  check("one meta per user (each is on one instance)", listed(a).every((p) => p.metas === 1), afterRejoin);
  check("the list is everyone online", show(ids(a)) === show(everyone), `${show(ids(a))} vs ${show(everyone)}`);

  // 4. B dies without a goodbye: its users leave within the TTL + 2 s.
  console.log("kill B");
  const killedAt = Date.now();
  const ofB = [B_WATCHER_ID, B_USER_ID, ...BATCH_IDS];
  const gone = await until(() => ofB.every((id) => !has(a, id)), TTL_MS + 2000 + WAIT_MS);
  const took = Date.now() - killedAt;
  check(`B's users leave the list within TTL + 2 s (${took} ms)`, gone && took <= TTL_MS + 2000, show(ids(a)));
  check("the watcher on A is still listed", has(a, WATCHER_ID), show(ids(a)));
  const after = await push(a.channel, "is_online", { user_id: Number(B_USER_ID) });
  check("is_online agrees after the crash", after.status === "ok" && after.response.online === false, show(after));
  a.socket.disconnect();
}

run(main, 120000);
