// Drives the dashboard in headless Chromium as an operator would, while
// sending API requests as an application would. Prints one JSON line of
// figures on success; exits non-zero with the reason otherwise.
//
// Environment: TANDEM_URL (the server's root), ADMIN_KEY, USER_KEY,
// CHROMIUM (the browser's path), SHOTS (a folder for screenshots).
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const base = process.env.TANDEM_URL;
const shots = process.env.SHOTS;
const figures = {};

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function ask(prompt, extraHeaders = {}) {
  const res = await fetch(base + "/v1/chat/completions", {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Authorization: "Bearer " + process.env.USER_KEY,
      ...extraHeaders,
    },
    body: JSON.stringify({
      model: "tandem/auto",
      messages: [{ role: "user", content: prompt }],
      max_tokens: 8,
      temperature: 0,
    }),
  });
  const body = await res.json();
  check(res.ok, "the API refused a request: " + JSON.stringify(body));
  return {
    done: Date.now(),
    side: res.headers.get("x-tandem-backend"),
    decidedBy: res.headers.get("x-tandem-decided-by"),
    requestId: res.headers.get("x-request-id"),
  };
}

// The row of the request with this id, once the page shows it, and how
// long after the answer was read it appeared (the page stamps each row
// with the time it was added; one clock, one machine). The promise is
// "within a second".
async function rowFor(page, req) {
  const row = page.locator(`#feed tbody tr[data-request-id="${req.requestId}"]`);
  await row.waitFor({ timeout: 5000 });
  const ms = Math.max(0, Number(await row.getAttribute("data-shown-at")) - req.done);
  check(ms <= 1000, `request ${req.requestId} reached the feed ${ms} ms after its answer`);
  return { row, ms };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // The key prompt's own 401 and 403 are expected; nothing else is.
  page.on("console", (m) => m.type() === "error" && !/status of 40[13]/.test(m.text()) && errors.push(m.text()));

  const t0 = Date.now();
  const res = await page.goto(base + "/ui", { waitUntil: "load" });
  check(res.status() === 200, "GET /ui answered " + res.status());
  figures.page_bytes = (await res.body()).length;
  figures.load_ms = Date.now() - t0;
  figures.first_paint_ms = await page.evaluate(() => {
    const p = performance.getEntriesByName("first-contentful-paint")[0] || performance.getEntriesByType("paint")[0];
    return p ? Math.round(p.startTime) : null;
  });

  // Keys are configured: the page asks for one, and a non-admin key is refused.
  await page.locator("#keyform.shown").waitFor({ timeout: 5000 });
  await page.fill("#key", process.env.USER_KEY);
  await page.click("#keyform button");
  await page.waitForFunction(() => document.getElementById("conn").textContent === "needs an admin key", null, { timeout: 5000 });
  await page.fill("#key", process.env.ADMIN_KEY);
  await page.click("#keyform button");
  await page.waitForFunction(() => document.getElementById("conn").textContent === "live", null, { timeout: 5000 });
  await page.waitForFunction(() => document.querySelectorAll("#upstreams tbody tr").length > 0, null, { timeout: 5000 });

  // A request appears in the feed within a second, with the side and rule
  // the API's headers named.
  const pointsBefore = Number(await page.getAttribute("#c-share", "data-points"));
  const first = await ask("What is the capital of France?");
  const seen = await rowFor(page, first);
  figures.feed_ms = [seen.ms];
  check(first.side === "local", "the first request ran on " + first.side);
  check((await seen.row.getAttribute("data-side")) === "local", "the feed shows another side");
  check((await seen.row.getAttribute("data-decided-by")) === first.decidedBy, "the feed shows another rule");
  await page.waitForFunction(
    (n) => Number(document.getElementById("c-share").dataset.points) > n, pointsBefore, { timeout: 3000 });
  await page.screenshot({ path: path.join(shots, "1-first-request.png"), fullPage: true });

  // An override moves the next request: a low battery sends it to the cloud.
  await page.click('#overrides button[data-k="battery_pct"]');
  await page.locator('#overrides button[data-k="battery_pct"].on').waitFor({ timeout: 5000 });
  const second = await ask("Name a primary colour. My email is jane.doe@example.com.", { "x-tandem-privacy": "redact" });
  const seen2 = await rowFor(page, second);
  figures.feed_ms.push(seen2.ms);
  check(second.side.startsWith("cloud"), "with the battery low the request ran on " + second.side);
  check(second.decidedBy === "device", "the battery did not decide: " + second.decidedBy);
  check((await seen2.row.getAttribute("data-side")) === "cloud", "the feed does not show the cloud");
  check((await seen2.row.getAttribute("data-decided-by")) === "device", "the feed does not show the device rule");
  check((await seen2.row.textContent()).includes("email"), "the feed does not show the redaction");
  check(!(await page.content()).includes("jane.doe"), "the page shows the personal data itself");

  // The ledger shows what left, and its chain verifies.
  await page.waitForFunction(() => {
    const s = document.getElementById("ledger-status");
    return s.dataset.ok === "true" && document.querySelectorAll("#ledger tbody tr").length > 0;
  }, null, { timeout: 8000 });

  // The totals and the charts follow.
  await page.waitForFunction(() => document.getElementById("t-cloud").textContent === "1", null, { timeout: 3000 });
  const cost = await page.getAttribute("#c-cost", "data-points");
  check(Number(cost) >= 2, "the cost chart plotted " + cost + " requests");

  // Clearing the override brings requests home again.
  await page.click("#clear");
  await page.locator('#overrides button[data-k="battery_pct"]:not(.on)').waitFor({ timeout: 5000 });
  const third = await ask("What is 2 + 2?");
  const seen3 = await rowFor(page, third);
  figures.feed_ms.push(seen3.ms);
  check(third.side === "local", "after clearing the override the request ran on " + third.side);

  // A click shows the whole decision.
  await seen2.row.click();
  const detail = await page.textContent("#detail-json");
  check(detail.includes('"features"') && detail.includes('"decided_by": "device"'), "the detail lacks the decision");
  await page.screenshot({ path: path.join(shots, "2-decision-detail.png"), fullPage: true });

  // A phone-sized screen: nothing runs off the side.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, "on a phone the page is " + overflow + " px wider than the screen");
  await page.screenshot({ path: path.join(shots, "3-phone.png"), fullPage: true });

  check(errors.length === 0, "the page logged errors: " + errors.join(" | "));
  console.log(JSON.stringify(figures));
} finally {
  await browser.close();
}
