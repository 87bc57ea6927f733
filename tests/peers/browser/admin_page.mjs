// Drives Debian's Chromium (headless, through playwright-core) over tsubame's admin
// page, as an operator would: load it, search for an address, open the message, press
// the CSV button. Job (JSON) in argv[2]: {"url", "address", "download_dir", "token"?}.
// Prints JSON: what the page showed at each step, and the downloaded file's path.
import { chromium } from "playwright-core";
import path from "node:path";

const job = JSON.parse(process.argv[2]);
const STEP_TIMEOUT_MS = 20000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // The machine's network is closed: no background fetches, no sandbox as root.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  timeout: STEP_TIMEOUT_MS,
});
const result = { console: [] };
try {
  const context = await browser.newContext({ acceptDownloads: true });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on("console", (message) =>
    result.console.push(message.type() + ": " + message.text() + " @ " + message.location().url),
  );
  page.on("pageerror", (error) => result.console.push("pageerror: " + error.message));
  await page.goto(job.url, { waitUntil: "load" });
  if (job.token) {
    // The page asks for the token when the API answers 401.
    await page.locator("#token-form").waitFor({ state: "visible" });
    await page.fill("#token", job.token);
    await page.click("#token-form button[type=submit]");
  }
  // The queue counts arrive from /api/queue.
  await page.waitForFunction(() => document.getElementById("count-messages").textContent !== "–");
  result.counts = await page.locator("#counts").innerText();
  result.queued_messages = await page.locator("#count-messages").innerText();

  await page.fill("#address", job.address);
  await page.click("#search");
  const row = page.locator("#results tbody tr", { hasText: job.address }).first();
  await row.waitFor();
  await page.waitForFunction(
    (address) =>
      [...document.querySelectorAll("#results tbody tr")].every((tr) => tr.textContent.includes(address)),
    job.address,
  );
  result.rows = await page
    .locator("#results tbody tr")
    .evaluateAll((rows) => rows.map((tr) => [...tr.cells].map((td) => td.textContent)));
  result.status_line = await page.locator("#status-line").innerText();

  // The per-message view, with the upstream's reply.
  await page.locator("#results tbody tr", { hasText: "delivered" }).first().click();
  await page.locator("#detail-events tbody tr").first().waitFor();
  await page.waitForFunction(() => document.getElementById("detail-queue").textContent !== "");
  result.detail_id = await page.locator("#detail-id").innerText();
  result.detail_rows = await page
    .locator("#detail-events tbody tr")
    .evaluateAll((rows) => rows.map((tr) => [...tr.cells].map((td) => td.textContent)));
  result.detail_queue = await page.locator("#detail-queue").innerText();

  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#csv")]);
  result.download_name = download.suggestedFilename();
  result.download_path = path.join(job.download_dir, result.download_name);
  await download.saveAs(result.download_path);

  if (job.hold_address) {
    // A message still queued: open it and press Hold.
    await page.fill("#address", job.hold_address);
    await page.click("#search");
    await page.locator("#results tbody tr", { hasText: job.hold_address }).first().click();
    await page.locator("#detail-actions").waitFor({ state: "visible" });
    result.queued_before = await page.locator("#detail-queue").innerText();
    await page.click("#detail-actions button[data-action=hold]");
    await page.waitForFunction(() => document.getElementById("detail-queue").textContent.includes("(held)"));
    result.queued_after = await page.locator("#detail-queue").innerText();
    result.status_after_hold = await page.locator("#status-line").innerText();
  }
  result.ok = true;
} catch (error) {
  result.ok = false;
  result.error = String(error && error.stack ? error.stack : error);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
