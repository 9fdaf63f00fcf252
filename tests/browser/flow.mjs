// Walks weightgate's pages in headless Chromium, as a researcher and as an administrator.
// Started by tests/browser.rs, which sets up the server and checks what this prints: one
// JSON object with what was seen. Screenshots go to $ARTIFACTS.
import { chromium } from "playwright-core";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";

const env = (k) => { const v = process.env[k]; if (!v) throw new Error(`missing ${k}`); return v; };
const BASE = env("BASE"), OUTBOX = env("OUTBOX"), ARTIFACTS = env("ARTIFACTS");
const SETUP_URL = env("SETUP_URL"), REJECT_STATUS_URL = env("REJECT_STATUS_URL"), REJECT_NAME = env("REJECT_NAME");
const ADMIN_EMAIL = "root@example.org", ADMIN_PASSWORD = "a long admin password";
const HOSTILE = {
  name: `<script>window.__xss = 1</script>Eve`,
  affiliation: `"><img src=x onerror="window.__xss = 2">`,
  intended_use: `=HYPERLINK("http://evil.example","click")`,
};
const out = { steps: [] };
const step = (name, data = {}) => out.steps.push({ name, ...data });

/// The newest confirmation link mailed to `to`, from the file transport's .eml files.
function confirmLink(to) {
  const files = readdirSync(OUTBOX).filter((f) => f.endsWith(".eml"))
    .map((f) => join(OUTBOX, f)).sort((a, b) => statSync(a).mtimeMs - statSync(b).mtimeMs);
  for (const f of files.reverse()) {
    const raw = readFileSync(f, "utf8").replace(/=\r?\n/g, "").replace(/=([0-9A-F]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16)));
    if (!raw.includes(`To: ${to}`)) continue;
    const m = raw.match(/https?:\/\/[^\s"<]+\/applications\/confirm\?code=[A-Za-z0-9_-]+/);
    if (m) return m[0];
  }
  return null;
}

async function waitFor(fn, what, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50)); // poll interval while the mail worker writes
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const dialogs = [];
try {
  const researcher = await browser.newContext();
  const page = await researcher.newPage();
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  const xss = async () => page.evaluate(() => window.__xss);

  // Catalogue → model page → apply with hostile values.
  await page.goto(`${BASE}/`);
  await page.click("text=acme/tiny");
  await page.fill("#name", HOSTILE.name);
  await page.fill("#email", "eve@example.org");
  await page.fill("#affiliation", HOSTILE.affiliation);
  await page.selectOption("#country", "FR");
  await page.fill("#intended_use", HOSTILE.intended_use);
  await page.fill("input[name='answer:Team size']", "3");
  await page.check("#accept_license");
  await page.screenshot({ path: join(ARTIFACTS, "1-apply.png"), fullPage: true });
  await page.click("#submit");
  await page.waitForSelector("text=Check your email");
  await page.screenshot({ path: join(ARTIFACTS, "2-applied.png"), fullPage: true });
  const statusUrl = await page.getAttribute("#status-link", "href");
  step("applied", { statusUrl });

  // Confirm with the link from the real email.
  const link = await waitFor(() => confirmLink("eve@example.org"), "the confirmation email");
  await page.goto(link);
  step("confirmed", { status: await page.textContent("#status") });

  // The first administrator, through the one-time setup link, then login.
  const admin = await browser.newContext();
  const ap = await admin.newPage();
  ap.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  await ap.goto(SETUP_URL);
  await ap.fill("#email", ADMIN_EMAIL);
  await ap.fill("#password", ADMIN_PASSWORD);
  await ap.fill("#password2", ADMIN_PASSWORD);
  await ap.click("#create");
  await ap.waitForSelector("#login");
  await ap.fill("#email", ADMIN_EMAIL);
  await ap.fill("#password", ADMIN_PASSWORD);
  await ap.click("#login");
  await ap.waitForSelector("#queue");
  await ap.screenshot({ path: join(ARTIFACTS, "3-queue.png"), fullPage: true });
  const cookies = await admin.cookies();
  const session = cookies.find((c) => c.name === "wg_session");
  step("logged_in", { httpOnly: session?.httpOnly, sameSite: session?.sameSite });
  const row = ap.locator("tr", { hasText: "eve@example.org" });
  step("queue", {
    rows: await ap.locator("#queue tbody tr").count(),
    hostileNameShown: (await row.locator(".applicant-name").textContent()).includes("<script>"),
    xss: await ap.evaluate(() => window.__xss),
  });

  // Approve Eve from the queue.
  await row.locator("button.approve").click();
  await ap.waitForSelector("#notice");
  step("approved_one", { notice: await ap.textContent("#notice") });

  // Reject one with a reason, from its row.
  const rejectRow = ap.locator("tr", { hasText: REJECT_NAME });
  await ap.fill("#reason", "Affiliation could not be verified");
  await rejectRow.locator("button.reject").click();
  await ap.waitForSelector("#notice");
  step("rejected_one", { notice: await ap.textContent("#notice") });

  // Bulk approve everything left.
  await ap.check("[data-select-all]");
  await ap.click("#bulk-approve");
  await ap.waitForSelector("#notice");
  step("bulk", { notice: await ap.textContent("#notice"), left: await ap.locator("#queue tbody tr").count() });

  // The applications CSV defuses formulas.
  const csv = await (await ap.request.get(`${BASE}/admin/applications.csv?status=all`)).text();
  step("csv", { defused: csv.includes(`"'=HYPERLINK(""http://evil.example"",""click"")"`), raw: csv.includes(`,=HYPERLINK`) });

  // A POST without the CSRF token is refused, even with the session cookie.
  const forged = await ap.request.post(`${BASE}/admin/applications/decide`, { form: { action: "approve", ids: "x" } });
  step("csrf", { status: forged.status() });

  // Other pages render.
  for (const [path, shot] of [["/admin/grants", "4-grants.png"], ["/admin/models/acme/tiny", "5-model.png"], ["/admin/audit", "6-audit.png"]]) {
    await ap.goto(`${BASE}${path}`);
    await ap.screenshot({ path: join(ARTIFACTS, shot), fullPage: true });
    if (path.startsWith("/admin/models/")) step("model_page", { hasChart: await ap.locator("#stats svg").count() });
  }

  // The researcher sees the approval and issues a token.
  await page.goto(statusUrl.startsWith("http") ? statusUrl : `${BASE}${statusUrl}`);
  step("status", { status: await page.textContent("#status"), xss: await xss() });
  await page.fill("#label", "laptop");
  await page.click("#issue-token");
  await page.waitForSelector("#token");
  await page.screenshot({ path: join(ARTIFACTS, "7-token.png"), fullPage: true });
  step("token", { token: (await page.textContent("#token")).trim(), curl: (await page.textContent("#new-token")).includes(`${BASE}/acme/tiny/resolve/main/`) });

  // The rejected researcher reads the reason.
  await page.goto(REJECT_STATUS_URL);
  step("rejected_status", { status: await page.textContent("#status"), reason: await page.textContent("#reason") });

  // Logout ends the session.
  await ap.goto(`${BASE}/admin/applications`);
  await ap.click("#logout");
  await ap.waitForSelector("#login");
  await ap.goto(`${BASE}/admin/applications`);
  step("after_logout", { url: ap.url() });

  // Lockout: wrong passwords, then even the right one is refused for a while.
  const other = await (await browser.newContext()).newPage();
  let last = null;
  for (let i = 0; i < 6; i++) {
    await other.goto(`${BASE}/admin/login`);
    await other.fill("#email", ADMIN_EMAIL);
    await other.fill("#password", i < 5 ? "wrong password " + i : ADMIN_PASSWORD);
    await other.click("#login");
    last = await other.textContent("#error");
  }
  step("lockout", { message: last });
  out.dialogs = dialogs;
  out.xss = (await xss()) ?? null;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
