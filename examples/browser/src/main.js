// Browser example for epoch-gateway, using the official phoenix.js client (the npm package `phoenix`).
//
// Reads its settings from the page URL:
//   ?socket=ws://127.0.0.1:4000/socket   the gateway's socket URL (phoenix.js appends /websocket?vsn=2.0.0)
//   &token=<JWT>                         optional; without it the socket is anonymous
//   &user=42                             the token's user id (joins user:<id>)
//   &presence=1                          optional; asks for the presence feed (the gateway's presence.feed
//                                        must admit this socket, or the join of user:public is refused)
// then connects, joins user:public (and user:role and user:<user> when a token is given), and shows the
// connection state, every event that arrives with its payload and position, and an "is user N online?" control.
//
// Who is online: with `presence=1`, user:public is joined with `presence: true`, and phoenix.js's own
// `Presence` class keeps the list from the gateway's `presence_state` and `presence_diff` events; the page
// shows it, one line per user with the number of gateway instances the user is connected to.
//
// Positions and recovery: every join asks for positions. Each channel remembers the last position it saw (a
// broadcast's ref, or the join reply's `position`), and its join params are a function, which phoenix.js
// calls again on every rejoin: after a dropped socket the rejoin sends `since` and the gateway replays what
// was missed (`recovered: true`), or says it cannot (`recovered: false`: a real client refetches its state).
//
// A real application gets its token from its login API; it is in the URL here only to keep the example
// small. Everything received is shown with textContent, never as HTML.
import { Presence, Socket } from "phoenix";

const params = new URLSearchParams(window.location.search);
const defaultSocket = `${window.location.protocol === "https:" ? "wss" : "ws"}://${window.location.hostname || "127.0.0.1"}:4000/socket`;
const socketUrl = params.get("socket") || defaultSocket;
const token = params.get("token") || "";
const user = params.get("user") || "";
const wantsPresence = params.get("presence") === "1";

const $ = (id) => document.getElementById(id);
const stateEl = $("state");
const logEl = $("log");
const channelsEl = $("channels");
// Per topic: the last position seen, and `recovered` of the last join (undefined for a join without `since`).
const positions = {};

// Connection state: shown on the page, kept in data-state for tests, and echoed to the console.
function setState(state, detail) {
  stateEl.textContent = detail ? `${state} (${detail})` : state;
  stateEl.dataset.state = state;
  console.log(`state: ${state}${detail ? " " + detail : ""}`);
}

// One line of the event log. kind: "event" (a broadcast from the gateway) or "info" (what this page did).
function log(kind, topic, event, payload, position) {
  const li = document.createElement("li");
  li.className = kind;
  li.dataset.topic = topic;
  li.dataset.event = event;
  if (position) li.dataset.position = position;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  const name = document.createElement("strong");
  name.textContent = `${topic} ${event}`;
  const body = document.createElement("code");
  body.textContent = payload === undefined ? "" : JSON.stringify(payload);
  li.append(time, " ", name, " ", body);
  if (position) {
    const at = document.createElement("small");
    at.className = "position";
    at.textContent = ` at ${position}`;
    li.append(at);
  }
  logEl.prepend(li);
}

// One line per channel: its status, last position and whether its last join recovered; the same in data-*
// attributes for tests (data-recovered: "true", "false", or "" for a join without `since`). Without a
// status, the line keeps the one it shows.
function showChannel(topic, status, detail) {
  let li = channelsEl.querySelector(`[data-topic="${CSS.escape(topic)}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.topic = topic;
    channelsEl.append(li);
  }
  if (status === undefined) [status, detail] = [li.dataset.status, li.dataset.detail];
  const { last, recovered } = positions[topic] || {};
  li.dataset.status = status;
  li.dataset.detail = detail || "";
  li.dataset.position = last || "";
  li.dataset.recovered = recovered === undefined ? "" : String(recovered);
  const facts = [`position ${last || "none yet"}`, `recovered: ${recovered === undefined ? "no since sent" : recovered}`];
  li.textContent = `${topic}: ${status}${detail ? " (" + detail + ")" : ""} · ${facts.join(" · ")}`;
}

$("socket-url").textContent = socketUrl;
$("identity").textContent = token ? `user ${user || "?"} (token given)` : "anonymous (no token)";

const socket = new Socket(socketUrl, { params: token ? { token } : {} });
socket.onOpen(() => setState("connected"));
// A refused upgrade (403: bad token, disallowed Origin) shows up as an error then a close; phoenix.js
// keeps retrying with backoff, so the state goes error -> closed -> error ... and never "connected".
socket.onError(() => setState("error", "the gateway refused or dropped the socket"));
// Browsers do not tell a page the HTTP status of a refused upgrade: a 403 looks like code 1006.
socket.onClose((e) =>
  setState("closed", e.code === 1006 ? "code 1006: refused (403: origin or token) or unreachable" : `code ${e.code}`),
);
// A broadcast is [null, "<position>", topic, event, payload] on a join with positions. Replies to this
// page's pushes are "phx_reply" on the socket and "chan_reply_<ref>" on the channel; neither is an event.
// The presence feed's events are shown as the list of who is online, not in the log.
const isBroadcast = (event) =>
  !event.startsWith("phx_") && !event.startsWith("chan_reply_") && !event.startsWith("presence_");

function join(topic, extra = {}) {
  const state = (positions[topic] = { last: null, recovered: undefined });
  // Evaluated on every (re)join: `since` once a position is known.
  const channel = socket.channel(topic, () => ({ ...extra, ...(state.last ? { since: state.last } : { positions: true }) }));
  // Every event of the channel passes here before its handlers (`channel.on(event, (payload, position) => …)`
  // gets the same position as its second argument): log it and remember its position.
  channel.onMessage = (event, payload, ref) => {
    if (isBroadcast(event)) {
      if (typeof ref === "string") state.last = ref;
      log("event", topic, event, payload, ref);
      showChannel(topic);
    }
    return payload;
  };
  showChannel(topic, "joining");
  channel
    .join()
    .receive("ok", (resp) => {
      state.recovered = resp.recovered;
      if (resp.recovered === false) {
        log("info", topic, "not recovered", { since: state.last, note: "a real client refetches its state here" });
      }
      if (resp.position) state.last = resp.position;
      showChannel(topic, "joined");
    })
    .receive("error", (resp) => showChannel(topic, "refused", resp && resp.reason))
    .receive("timeout", () => showChannel(topic, "timeout"));
  channel.onError(() => showChannel(topic, "errored"));
  return channel;
}

// The list of who is online, kept by phoenix.js `Presence`; each user's metas are the instances it is on.
function showPresence(presence) {
  const list = $("presence");
  const users = presence.list((id, { metas }) => ({ id, instances: metas.length }));
  users.sort((a, b) => Number(a.id) - Number(b.id));
  list.replaceChildren(
    ...users.map(({ id, instances }) => {
      const li = document.createElement("li");
      li.dataset.user = id;
      li.textContent = `user ${id}${instances > 1 ? ` (on ${instances} instances)` : ""}`;
      return li;
    }),
  );
  list.dataset.count = String(users.length);
}

setState("connecting");
socket.connect();
const publicChannel = join("user:public", wantsPresence ? { presence: true } : {});
if (wantsPresence) {
  const presence = new Presence(publicChannel);
  presence.onSync(() => showPresence(presence));
  $("presence-section").hidden = false;
}
if (token) {
  join("user:role");
  if (user) join(`user:${user}`);
}

// "Is user N online?": pushes is_online on user:public (any joined user:* topic answers it).
$("online-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const raw = $("online-user").value.trim();
  const result = $("online-result");
  const userId = /^\d+$/.test(raw) ? Number(raw) : raw;
  result.textContent = "asking…";
  delete result.dataset.online;
  publicChannel
    .push("is_online", { user_id: userId })
    .receive("ok", (resp) => {
      result.dataset.online = String(resp.online);
      result.textContent = `user ${resp.id} is ${resp.online ? "online" : "offline"}  ${JSON.stringify(resp)}`;
      log("info", "user:public", "is_online reply", resp);
    })
    .receive("error", (resp) => {
      result.dataset.online = "error";
      result.textContent = `error: ${resp && resp.reason}`;
    })
    .receive("timeout", () => {
      result.dataset.online = "timeout";
      result.textContent = "no reply (timeout)";
    });
});
if (user) $("online-user").value = user;

// For tests and for trying recovery by hand (from the console): drop the socket as a network failure would
// leave it (the channels error), then connect again (the channels rejoin with `since`).
window.epochExample = {
  drop: () => new Promise((resolve) => socket.disconnect(resolve)),
  reconnect: () => socket.connect(),
  positions: () => JSON.parse(JSON.stringify(positions)),
};
