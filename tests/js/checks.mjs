// What the delivery scripts share: environment, `ok - …` / `not ok - …` checks with the final
// `N passed, M failed` line, bounded waits, and the checks of a received sequence of events.

export function env(name) {
  const v = process.env[name];
  if (!v) { console.error(`missing environment variable ${name}`); process.exit(1); }
  return v;
}

let passed = 0, failed = 0;
export function check(name, ok, details) {
  if (ok) { passed++; console.log(`ok - ${name}`); }
  else { failed++; console.log(`not ok - ${name}${details === undefined ? "" : ": " + details}`); }
  return ok;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls cond() until true or `ms` elapsed; resolves to the final cond() value.
export async function until(cond, ms) {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(10);
  return cond();
}

// A position is an opaque string that is never a decimal (phoenix.js refs are).
export const isPosition = (p) => typeof p === "string" && p.length > 0 && Number.isNaN(Number(p));

// What is wrong with a received sequence of `n`s compared with 0..count-1; empty when nothing is.
export function sequenceProblems(ns, count) {
  const problems = [];
  const seen = new Map();
  ns.forEach((n) => seen.set(n, (seen.get(n) || 0) + 1));
  const missing = [];
  for (let n = 0; n < count; n++) if (!seen.has(n)) missing.push(n);
  const duplicated = [...seen].filter(([, c]) => c > 1).map(([n, c]) => `${n}x${c}`);
  const foreign = [...seen.keys()].filter((n) => !(Number.isInteger(n) && n >= 0 && n < count));
  const reordered = [];
  for (let i = 1; i < ns.length; i++) if (ns[i] <= ns[i - 1]) reordered.push(`${ns[i - 1]}->${ns[i]} at ${i}`);
  const few = (list) => list.slice(0, 10).join(", ") + (list.length > 10 ? `, … (${list.length} in all)` : "");
  if (missing.length) problems.push(`missing ${few(missing)}`);
  if (duplicated.length) problems.push(`duplicated ${few(duplicated)}`);
  if (foreign.length) problems.push(`unexpected ${few(foreign)}`);
  if (reordered.length) problems.push(`out of order ${few(reordered)}`);
  return problems;
}

// Runs main() under a hard timeout, prints the summary and exits 0 only if every check passed.
export async function run(main, hardTimeoutMs) {
  const hard = setTimeout(() => {
    check(`finished within the hard timeout of ${hardTimeoutMs / 1000} s`, false);
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(1);
  }, hardTimeoutMs);
  try {
    await main();
  } catch (err) {
    check("script ran to the end", false, err?.stack || String(err));
  }
  clearTimeout(hard);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 && passed > 0 ? 0 : 1);
}
