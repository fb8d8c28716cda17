// Load a t3d page in headless Chromium and say what a person would see.
//
//   node scripts/page_check.mjs URL SCREENSHOT.png OUT.json [TIMEOUT_MS]
//
// TIMEOUT_MS (default 60000) bounds the page load and the viewer's load; the whole check gives up
// after 2 x TIMEOUT_MS + 30 s (OUT.json then says so and the exit code is 3).
// WebGL runs on SwiftShader (Chromium's CPU renderer), so the check needs no GPU. OUT.json gets
// {console_errors, page_errors, failed_requests, http_errors, external_requests, loaded, box, images,
// videos, ms}:
// `loaded` is model-viewer's state (true after its `load` event, false after `error` or the timeout,
// null when the page has no viewer); `box` is the viewer's box in the screenshot (page pixels), which
// is of the viewer alone when the page has one, else of the whole page.
// Chromium is /usr/bin/chromium unless T3D_CHROMIUM says otherwise; playwright-core comes from web/.
import { writeFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(new URL("../web/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const [url, shotPath, outPath, timeoutArg] = process.argv.slice(2);
if (!url || !shotPath || !outPath) {
  console.error("usage: node scripts/page_check.mjs URL SCREENSHOT.png OUT.json [TIMEOUT_MS]");
  process.exit(2);
}
const timeoutMs = Number(timeoutArg || 60000);

const browser = await chromium.launch({
  executablePath: process.env.T3D_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", // root in CI containers: Chromium's sandbox refuses to start as root
    "--use-angle=swiftshader", // WebGL on the CPU: no GPU here
    "--enable-unsafe-swiftshader", // allow that fallback without the deprecation refusal
    "--ignore-gpu-blocklist",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--mute-audio",
  ],
});
const result = {
  url,
  console_errors: [],
  page_errors: [],
  failed_requests: [],
  http_errors: [],
  external_requests: [],
  loaded: null,
  box: null,
  images: [],
  videos: [],
  ms: {},
};
const t0 = Date.now();
// A hard deadline over the whole check: SwiftShader on a saturated CPU can stall frames, decodes or
// the screenshot indefinitely, and a check that never returns is worse than one that says so.
const deadlineMs = 2 * timeoutMs + 30000;
const watchdog = setTimeout(() => {
  result.page_errors.push(`page_check: no result within ${deadlineMs} ms (a stalled browser; is the CPU saturated?)`);
  result.ms.done = Date.now() - t0;
  writeFileSync(outPath, JSON.stringify(result, null, 2));
  browser.close().catch(() => null); // not awaited: a stalled browser may never answer
  setTimeout(() => process.exit(3), 2000);
}, deadlineMs);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push(msg.text());
  });
  page.on("pageerror", (err) => result.page_errors.push(String(err)));
  page.on("requestfailed", (req) => result.failed_requests.push(`${req.url().slice(0, 200)}: ${req.failure()?.errorText}`));
  page.on("response", (res) => {
    if (res.status() >= 400) result.http_errors.push(`${res.status()} ${res.url().slice(0, 200)}`);
  });
  page.on("request", (req) => {
    const u = req.url();
    const local = /^(file|data|blob):/.test(u) || /^https?:\/\/(127\.0\.0\.1|localhost)[:/]/.test(u);
    if (!local) result.external_requests.push(u.slice(0, 200));
  });
  result.ms.launched = Date.now() - t0;
  await page.goto(url, { waitUntil: "load", timeout: timeoutMs });
  result.ms.page_loaded = Date.now() - t0;

  // model-viewer: its `loaded` property, or the `load`/`error` event, or the timeout.
  result.loaded = await page.evaluate(async (ms) => {
    const viewer = document.querySelector("model-viewer");
    if (!viewer) return null;
    if (!customElements.get("model-viewer")) return false;
    if (viewer.loaded) return true;
    return await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      viewer.addEventListener("load", () => (clearTimeout(timer), resolve(true)), { once: true });
      viewer.addEventListener("error", () => (clearTimeout(timer), resolve(false)), { once: true });
    });
  }, timeoutMs);
  result.ms.viewer_loaded = Date.now() - t0;
  if (result.loaded) {
    // a few frames after `load`: the first drawn frame, with the poster gone
    await page.evaluate(
      () =>
        new Promise((resolve) => {
          let left = 10;
          const tick = () => (--left > 0 ? requestAnimationFrame(tick) : resolve());
          requestAnimationFrame(tick);
        }),
    );
    result.ms.frames = Date.now() - t0;
    await page.waitForTimeout(500);
  }
  // every image decoded (the gallery's thumbnails, the report's turntables and curves); lazy ones
  // below the fold would never load in a page nobody scrolls, so they are made eager first
  await page.evaluate(() =>
    Promise.all(
      [...document.images].map((img) => {
        img.loading = "eager";
        const late = new Promise((resolve) => setTimeout(resolve, 20000));
        return Promise.race([img.decode().catch(() => null), late]);
      }),
    ),
  );
  result.images = await page.evaluate(() =>
    [...document.images].map((img) => ({ src: img.getAttribute("src"), naturalWidth: img.naturalWidth })),
  );
  result.videos = await page.evaluate(() =>
    [...document.querySelectorAll("video")].map((v) => ({
      src: v.currentSrc || v.getAttribute("src"),
      readyState: v.readyState,
      videoWidth: v.videoWidth,
      error: v.error ? v.error.code : null,
    })),
  );
  result.ms.media = Date.now() - t0;
  const viewer = await page.$("model-viewer");
  if (viewer) {
    await viewer.scrollIntoViewIfNeeded();
    result.box = await viewer.boundingBox();
    await viewer.screenshot({ path: shotPath });
  } else {
    await page.screenshot({ path: shotPath, fullPage: true });
    const size = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]);
    result.box = { x: 0, y: 0, width: size[0], height: size[1] };
  }
} catch (err) {
  result.page_errors.push(`page_check: ${err}`);
} finally {
  result.ms.done = Date.now() - t0;
  writeFileSync(outPath, JSON.stringify(result, null, 2));
  await browser.close();
  clearTimeout(watchdog);
}
