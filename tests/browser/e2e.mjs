// End-to-end test of the browser example (examples/browser) in headless Chromium against the real gateway.
//
// Starts nats-server (random port, temporary JetStream store) and target/debug/epoch-gateway (random port,
// subject prefix and presence bucket, an allowed Origin of http://127.0.0.1:<page port>), serves
// examples/browser from a small HTTP server, opens the page with a minted token in Chromium (playwright-core,
// the system's /usr/bin/chromium), publishes events on NATS and checks that the page shows them, asks
// is_online through the page's control, and checks that the same page served from another origin never
// connects (the upgrade is refused with 403), and that a page whose socket drops and comes back while events
// are published recovers them: the rejoin sends `since`, the join says `recovered: true`, and every event is
// shown once, in order. With the presence feed on, a second page as another user appears in the first
// page's "Online now" list (and the first in its), and leaves the list when it closes. Saves
// target/browser-e2e.png (and -refused.png).
//
// Prerequisites (scripts/browser-test.sh does all of them): `npm ci && npm run build` in examples/browser,
// `cargo build`, `scripts/setup.sh --nats-only`, Chromium installed.
// Env overrides: GATEWAY_BIN, NATS_SERVER_BIN, CHROMIUM_PATH.
// Output: `ok - …` / `not ok - …` per check and a final `N passed, N failed`; exit 0 only if all passed.
import { spawn, execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const EXAMPLE = path.join(ROOT, "examples/browser");
// The Node packages (playwright-core, nats) are those of the example, installed by `npm ci` there.
const require = createRequire(path.join(EXAMPLE, "package.json"));
const { chromium } = require("playwright-core");
const { connect, StringCodec } = require("nats");

const GATEWAY_BIN = process.env.GATEWAY_BIN || path.join(ROOT, "target/debug/epoch-gateway");
const NATS_SERVER_BIN = process.env.NATS_SERVER_BIN || path.join(ROOT, ".tools/nats-server-bin/bin/nats-server");
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SCREENSHOT = path.join(ROOT, "target/browser-e2e.png");
const SCREENSHOT_REFUSED = path.join(ROOT, "target/browser-e2e-refused.png");

const WAIT_MS = 10_000; // any single wait
const REFUSED_WATCH_MS = 3_000; // how long the refused page is watched for a "connected" that must not come
const HARD_TIMEOUT_MS = 120_000; // the whole run
const USER_ID = "42";
const OFFLINE_USER_ID = "7";
const OTHER_USER_ID = "43";
const SECRET = randomBytes(32).toString("hex");
const RUN = randomBytes(4).toString("hex");
const PREFIX = `e2e${RUN}`;
const BUCKET = `e2e_presence_${RUN}`;

let passed = 0;
let failed = 0;
function check(name, ok, details) {
  if (ok) {
    passed++;
    console.log(`ok - ${name}`);
  } else {
    failed++;
    console.log(`not ok - ${name}${details === undefined ? "" : ": " + details}`);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------------------
// Processes and servers, all cleaned up in cleanup().

const children = [];
const servers = [];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "epoch-browser-e2e-"));
let browser = null;
let nc = null;

// Spawns a process with its stdout+stderr appended to a log file; resolves the first match of `ready`
// in its output, or rejects on exit or after WAIT_MS.
function start(name, bin, args, env, ready) {
  const logPath = path.join(tmp, `${name}.log`);
  const logFile = fs.openSync(logPath, "a");
  const child = spawn(bin, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  const entry = { name, child, logPath, exited: null };
  children.push(entry);
  child.on("exit", (code, signal) => (entry.exited = { code, signal }));
  return new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`${name}: not ready within ${WAIT_MS} ms`)), WAIT_MS);
    const onData = (chunk) => {
      fs.writeSync(logFile, chunk);
      if (seen === null) return;
      seen += chunk.toString();
      const m = seen.match(ready);
      if (m) {
        seen = null;
        clearTimeout(timer);
        resolve({ ...entry, match: m });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited early (code ${code}, signal ${signal}); log: ${logPath}`));
    });
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`${name}: ${e.message}`));
    });
  });
}

// Sends `signal` and waits up to `ms` for the exit; SIGKILL after that. Resolves the exit status.
function stop(entry, signal = "SIGTERM", ms = 15_000) {
  if (entry.exited) return Promise.resolve(entry.exited);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      entry.child.kill("SIGKILL");
    }, ms);
    entry.child.once("exit", (code, sig) => {
      clearTimeout(timer);
      resolve({ code, signal: sig });
    });
    entry.child.kill(signal);
  });
}

// A static server for examples/browser: index.html and dist/ only.
function servePage() {
  const files = {
    "/": ["index.html", "text/html; charset=utf-8"],
    "/index.html": ["index.html", "text/html; charset=utf-8"],
    "/dist/app.js": ["dist/app.js", "text/javascript; charset=utf-8"],
    "/dist/app.js.map": ["dist/app.js.map", "application/json"],
  };
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, "http://x").pathname];
    if (!file) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" });
    fs.createReadStream(path.join(EXAMPLE, file[0])).pipe(res);
  });
  servers.push(server);
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server.address().port));
  });
}

function httpGet(url) {
  return new Promise((resolve) => {
    const req = http.get(url, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    req.setTimeout(2000, () => req.destroy());
    req.on("error", () => resolve(0));
  });
}

// A raw WebSocket upgrade request with the given Origin; resolves the HTTP status (101 when upgraded).
function upgradeStatus(port, origin) {
  return new Promise((resolve) => {
    const req = http.request({
      host: "127.0.0.1",
      port,
      path: "/socket/websocket?vsn=2.0.0",
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
        Origin: origin,
      },
    });
    req.setTimeout(WAIT_MS, () => req.destroy());
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve(res.statusCode);
    });
    req.on("response", (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on("error", () => resolve(0));
    req.end();
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(cond, ms = WAIT_MS) {
  const end = Date.now() + ms;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > end) return false;
    await sleep(50);
  }
}

function tail(file, lines = 30) {
  try {
    return fs.readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

let cleanedUp = false;
async function cleanup() {
  if (cleanedUp) return;
  cleanedUp = true;
  if (browser) await browser.close().catch(() => {});
  if (nc) await nc.close().catch(() => {});
  for (const s of servers) s.close();
  for (const entry of [...children].reverse()) await stop(entry);
  fs.rmSync(tmp, { recursive: true, force: true });
}
// Last resort: never leave a child behind, whatever happens.
process.on("exit", () => {
  for (const { child, exited } of children) if (!exited) child.kill("SIGKILL");
});
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, async () => {
    console.log(`not ok - interrupted by ${sig}`);
    await cleanup();
    process.exit(1);
  });
}
const hardTimer = setTimeout(async () => {
  console.log(`not ok - hard timeout of ${HARD_TIMEOUT_MS} ms`);
  failed++;
  await cleanup();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(1);
}, HARD_TIMEOUT_MS);

// ---------------------------------------------------------------------------------------------------------

// Reads the page's state: data-state of #state, the channels' statuses, positions and `recovered`, the event
// log (oldest first).
const pageState = (page) =>
  page.evaluate(() => ({
    state: document.getElementById("state").dataset.state,
    channels: Object.fromEntries(
      [...document.querySelectorAll("#channels li")].map((li) => [li.dataset.topic, li.dataset.status]),
    ),
    recovery: Object.fromEntries(
      [...document.querySelectorAll("#channels li")].map((li) => [
        li.dataset.topic,
        { position: li.dataset.position, recovered: li.dataset.recovered },
      ]),
    ),
    events: [...document.querySelectorAll("#log li.event")].reverse().map((li) => ({
      topic: li.dataset.topic,
      event: li.dataset.event,
      payload: li.querySelector("code").textContent,
      position: li.dataset.position,
    })),
  }));

async function main() {
  for (const [what, file] of [
    ["gateway binary (cargo build)", GATEWAY_BIN],
    ["nats-server (scripts/setup.sh --nats-only)", NATS_SERVER_BIN],
    ["chromium", CHROMIUM_PATH],
    ["examples/browser/dist/app.js (npm run build)", path.join(EXAMPLE, "dist/app.js")],
  ]) {
    if (!fs.existsSync(file)) throw new Error(`missing ${what}: ${file}`);
  }

  // Page servers first: the allowed origin must be known when the gateway starts.
  const pagePort = await servePage();
  const otherPagePort = await servePage();
  const allowedOrigin = `http://127.0.0.1:${pagePort}`;
  const otherOrigin = `http://127.0.0.1:${otherPagePort}`;

  const nats = await start(
    "nats-server",
    NATS_SERVER_BIN,
    ["-a", "127.0.0.1", "-p", "-1", "-js", "-sd", path.join(tmp, "js")],
    process.env,
    /Listening for client connections on [^\s]*:(\d+)/,
  );
  const natsUrl = `nats://127.0.0.1:${nats.match[1]}`;

  // The gateway sees only the variables set here (none inherited from the caller's EPOCH_GATEWAY*).
  const gatewayEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("EPOCH_GATEWAY")));
  Object.assign(gatewayEnv, {
    EPOCH_GATEWAY__HTTP__LISTEN: "127.0.0.1:0",
    EPOCH_GATEWAY__HTTP__ALLOWED_ORIGINS: allowedOrigin,
    EPOCH_GATEWAY__NATS__URL: natsUrl,
    EPOCH_GATEWAY__NATS__SUBJECT_PREFIX: PREFIX,
    EPOCH_GATEWAY__PRESENCE__BUCKET: BUCKET,
    EPOCH_GATEWAY__AUTH__SECRET: SECRET,
    EPOCH_GATEWAY__SHUTDOWN__DRAIN_SECS: "1",
    EPOCH_GATEWAY__SHUTDOWN__GRACE_SECS: "5",
    EPOCH_GATEWAY__PRESENCE__FEED: "authenticated",
    EPOCH_GATEWAY__PRESENCE__FEED_INTERVAL_MS: "200",
  });
  const gateway = await start("gateway", GATEWAY_BIN, ["serve"], gatewayEnv, /listening on [^\s]*:(\d+)/);
  const gatewayPort = gateway.match[1];
  const ready = await until(async () => (await httpGet(`http://127.0.0.1:${gatewayPort}/readyz`)) === 200);
  if (!check("gateway is ready (/readyz 200)", ready, tail(gateway.logPath))) return;

  const token = execFileSync(GATEWAY_BIN, ["token", "--user", USER_ID], { env: gatewayEnv, encoding: "utf8" }).trim();
  check("minted a token for user 42", /^[\w-]+\.[\w-]+\.[\w-]+$/.test(token));

  nc = await connect({ servers: natsUrl, timeout: WAIT_MS });
  const sc = StringCodec();
  const publish = async (subject, event, payload) => {
    nc.publish(subject, sc.encode(JSON.stringify({ event, payload })));
    await nc.flush();
  };

  browser = await chromium.launch({ executablePath: CHROMIUM_PATH, headless: true, timeout: 30_000 });
  const query = new URLSearchParams({ socket: `ws://127.0.0.1:${gatewayPort}/socket`, token, user: USER_ID, presence: "1" });

  // --- The page from the allowed origin -----------------------------------------------------------------
  const page = await browser.newPage({ viewport: { width: 1000, height: 720 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.setDefaultTimeout(WAIT_MS);
  await page.goto(`${allowedOrigin}/?${query}`);

  const connected = await page
    .waitForFunction(() => document.getElementById("state").dataset.state === "connected", null, { timeout: WAIT_MS })
    .then(() => true, () => false);
  if (!check("page connects to the gateway (state: connected)", connected, JSON.stringify(await pageState(page)))) return;

  const topics = ["user:public", "user:role", `user:${USER_ID}`];
  const joined = await page
    .waitForFunction(
      (ts) => ts.every((t) => document.querySelector(`#channels li[data-topic="${t}"]`)?.dataset.status === "joined"),
      topics,
      { timeout: WAIT_MS },
    )
    .then(() => true, () => false);
  if (!check(`page joins ${topics.join(", ")}`, joined, JSON.stringify((await pageState(page)).channels))) return;

  // A join's ok reply means the socket is subscribed: what is published now is delivered.
  const published = [
    [`${PREFIX}.user.public`, "user:public", "announcement", { message: "Maintenance at 22:00", id: RUN }],
    [`${PREFIX}.user.${USER_ID}`, `user:${USER_ID}`, "refreshMentions", {}],
    [`${PREFIX}.user.role`, "user:role", "permissionsChanged", { lookup: "user" }],
  ];
  for (const [subject, , event, payload] of published) await publish(subject, event, payload);
  for (const [subject, topic, event, payload] of published) {
    const want = JSON.stringify(payload);
    const seen = await until(async () =>
      (await pageState(page)).events.some((e) => e.topic === topic && e.event === event && e.payload === want),
    );
    check(`${subject} ${event} appears in the page's log on ${topic}`, seen, JSON.stringify((await pageState(page)).events));
  }
  await sleep(300); // quiet period: a duplicate would show up here
  const counts = (await pageState(page)).events.length;
  check("each event is shown exactly once", counts === published.length, `${counts} log entries`);

  // is_online through the page's control.
  async function askOnline(userId) {
    await page.fill("#online-user", userId);
    await page.click("#online-ask");
    await page.waitForFunction(() => document.getElementById("online-result").dataset.online !== undefined, null, {
      timeout: WAIT_MS,
    });
    return page.evaluate(() => {
      const el = document.getElementById("online-result");
      return { online: el.dataset.online, text: el.textContent };
    });
  }
  const offline = await askOnline(OFFLINE_USER_ID);
  check(`is_online for user ${OFFLINE_USER_ID} shows online: false`, offline.online === "false", JSON.stringify(offline));
  const online = await askOnline(USER_ID);
  check(
    `is_online for user ${USER_ID} shows online: true`,
    online.online === "true" && online.text.includes(`{"id":${USER_ID},"online":true}`),
    JSON.stringify(online),
  );

  // --- Positions, and recovery after a dropped socket -----------------------------------------------------
  const userTopic = `user:${USER_ID}`;
  const userSubject = `${PREFIX}.user.${USER_ID}`;
  const before = await pageState(page);
  check(
    "broadcasts carry positions that are not decimal numbers",
    before.events.length > 0 && before.events.every((e) => e.position && !/^\d+$/.test(e.position)),
    JSON.stringify(before.events),
  );
  check(
    "every channel shows a position after its join",
    topics.every((t) => before.recovery[t]?.position),
    JSON.stringify(before.recovery),
  );
  const message = (n) => ({ n, run: RUN });
  const messages = (state) =>
    state.events.filter((e) => e.topic === userTopic && e.event === "newMessage").map((e) => JSON.parse(e.payload).n);
  const total = 30;
  let n = 0;
  const publishUpTo = async (last, pauseMs = 0) => {
    while (n < last) {
      n++;
      await publish(userSubject, "newMessage", message(n));
      if (pauseMs) await sleep(pauseMs);
    }
  };
  await publishUpTo(5);
  const live = await until(async () => messages(await pageState(page)).length === 5);
  check("5 events arrive live before the drop", live, JSON.stringify(messages(await pageState(page))));
  await page.evaluate(() => window.epochExample.drop());
  const closed = await until(async () => (await pageState(page)).state === "closed");
  check("the page's socket is dropped (state: closed)", closed, JSON.stringify(await pageState(page)));
  await publishUpTo(15); // while no socket of user 42 is connected anywhere
  await publish(`${PREFIX}.user.public`, "announcement", { message: "while you were away", id: RUN });
  await page.evaluate(() => window.epochExample.reconnect());
  await publishUpTo(25, 20); // while the socket reconnects and the channels rejoin with `since`
  const rejoined = await page
    .waitForFunction(
      (t) => {
        const li = document.querySelector(`#channels li[data-topic="${t}"]`);
        return li?.dataset.status === "joined" && li.dataset.recovered !== "";
      },
      userTopic,
      { timeout: WAIT_MS },
    )
    .then(() => true, () => false);
  await publishUpTo(total); // after the rejoin
  await until(async () => messages(await pageState(page)).length >= total);
  await sleep(300); // quiet period: a duplicate would show up here
  const after = await pageState(page);
  check(
    `${userTopic} rejoins with since and shows recovered: true`,
    rejoined && after.recovery[userTopic]?.recovered === "true",
    JSON.stringify(after.recovery),
  );
  check(
    "user:public and user:role rejoin with since and show recovered: true",
    ["user:public", "user:role"].every((t) => after.recovery[t]?.recovered === "true"),
    JSON.stringify(after.recovery),
  );
  const seen = messages(after);
  const expected = Array.from({ length: total }, (_, i) => i + 1);
  check(
    `every event published before, during and after the drop is shown once, in order (${total} on ${userTopic})`,
    JSON.stringify(seen) === JSON.stringify(expected),
    JSON.stringify(seen),
  );
  const away = after.events.filter((e) => e.topic === "user:public" && e.payload.includes("while you were away"));
  check("the announcement published during the drop is shown once", away.length === 1, JSON.stringify(away));
  const ownPositions = after.events.filter((e) => e.topic === userTopic).map((e) => e.position);
  check(
    `${userTopic} positions are all different`,
    new Set(ownPositions).size === ownPositions.length,
    JSON.stringify(ownPositions),
  );
  check("no uncaught errors in the page", pageErrors.length === 0, pageErrors.join("; "));

  // --- Who is online: a second page as another user ------------------------------------------------------
  const listed = (p) =>
    p.evaluate(() => [...document.querySelectorAll("#presence li")].map((li) => li.dataset.user).sort());
  const lists = async (p, users) => JSON.stringify(await listed(p)) === JSON.stringify([...users].sort());
  check(`the page lists user ${USER_ID} online`, await until(() => lists(page, [USER_ID])), JSON.stringify(await listed(page)));
  const otherToken = execFileSync(GATEWAY_BIN, ["token", "--user", OTHER_USER_ID], { env: gatewayEnv, encoding: "utf8" }).trim();
  const other = await browser.newPage({ viewport: { width: 1000, height: 520 } });
  other.on("pageerror", (e) => pageErrors.push(e.message));
  const otherQuery = new URLSearchParams({ socket: query.get("socket"), token: otherToken, user: OTHER_USER_ID, presence: "1" });
  await other.goto(`${allowedOrigin}/?${otherQuery}`);
  const both = [USER_ID, OTHER_USER_ID];
  check(`a second page as user ${OTHER_USER_ID} lists both users`, await until(() => lists(other, both)), JSON.stringify(await listed(other)));
  check(`the first page sees user ${OTHER_USER_ID} appear`, await until(() => lists(page, both)), JSON.stringify(await listed(page)));
  await other.close();
  check(`the first page sees user ${OTHER_USER_ID} leave when its page closes`, await until(() => lists(page, [USER_ID])),
    JSON.stringify(await listed(page)));
  check("no uncaught errors in either page", pageErrors.length === 0, pageErrors.join("; "));

  fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`# screenshot: ${path.relative(ROOT, SCREENSHOT)}`);

  // --- The same page from an origin that is not allowed ---------------------------------------------------
  check(`upgrade with Origin ${allowedOrigin} gets 101`, (await upgradeStatus(gatewayPort, allowedOrigin)) === 101);
  const status = await upgradeStatus(gatewayPort, otherOrigin);
  check(`upgrade with Origin ${otherOrigin} gets 403`, status === 403, `status ${status}`);

  const refused = await browser.newPage({ viewport: { width: 1000, height: 520 } });
  const consoleLines = [];
  refused.on("console", (m) => consoleLines.push(m.text()));
  await refused.goto(`${otherOrigin}/?${query}`);
  const failedState = await refused
    .waitForFunction(() => ["error", "closed"].includes(document.getElementById("state").dataset.state), null, {
      timeout: WAIT_MS,
    })
    .then(() => true, () => false);
  check("page from a disallowed origin shows an error/closed state", failedState, JSON.stringify(await pageState(refused)));
  await sleep(REFUSED_WATCH_MS); // phoenix.js retries meanwhile; none of its attempts may connect
  const states = consoleLines.filter((l) => l.startsWith("state: ")).map((l) => l.split(" ")[1]);
  check(
    `page from a disallowed origin never connects (watched ${REFUSED_WATCH_MS} ms, ${states.filter((s) => s === "error").length} refused attempts)`,
    !states.includes("connected") && (await pageState(refused)).state !== "connected",
    states.join(","),
  );
  check(
    "Chromium reports the refused upgrade as HTTP 403",
    consoleLines.some((l) => /WebSocket/.test(l) && /403/.test(l)),
    JSON.stringify(consoleLines.filter((l) => !l.startsWith("state: ")).slice(0, 3)),
  );
  await refused.screenshot({ path: SCREENSHOT_REFUSED, fullPage: true });

  // --- Shutdown -------------------------------------------------------------------------------------------
  await browser.close();
  browser = null;
  const exit = await stop(children.find((c) => c.name === "gateway"));
  check("gateway exits 0 on SIGTERM", exit.code === 0, JSON.stringify(exit));
}

try {
  await main();
} catch (e) {
  check("e2e run", false, e.stack || String(e));
}
if (failed > 0) {
  for (const { name, logPath } of children) console.log(`# last lines of ${name} log:\n${tail(logPath).replace(/^/gm, "#   ")}`);
}
await cleanup();
clearTimeout(hardTimer);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
