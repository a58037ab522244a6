"""Check every page of the built docs in a real browser for clipped or overlapping text.

Run from the repository root (CI runs it after the docs build)::

    .venv/bin/python docs/check_pages.py                      # build to a temp dir, check
    .venv/bin/python docs/check_pages.py --site site          # check a built site
    .venv/bin/python docs/check_pages.py --screenshots shots  # also save a PNG per page

Each page is opened in headless Chromium (Debian package ``chromium``), at a desktop
and a phone width, with a small script added to a copy of the page that measures,
after layout:

* text cut off by a box that hides its overflow (not a box that scrolls);
* text of two elements drawn over each other in the page's content;
* images that failed to load;
* a page wider than the window (something overflows sideways).

The pictures are SVG files: their own text is checked by opening each image alone the
same way. Without Chromium the script says so and exits 0, so CI on a machine without
it still passes; with it, any problem fails the run (exit 1), listed one per line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Window sizes: a laptop and a phone.
WIDTHS = ((1280, 900), (390, 844))

#: Problems that measure smaller than this (CSS pixels) are rounding, not a problem.
SLACK = 2

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: The flags that keep a headless run quiet, offline and from touching the profile.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
)

#: Runs in the page after load; writes its findings as JSON into #tcpclose-check.
_PROBE = r"""
<script>
window.addEventListener("load", () => setTimeout(() => {
  const SLACK = %(slack)d;
  const problems = [];
  const describe = (el) => {
    const text = (el.innerText || el.textContent || "").trim().replace(/\s+/g, " ");
    return el.tagName.toLowerCase() + (el.className && typeof el.className === "string"
      ? "." + el.className.trim().split(/\s+/)[0] : "") + " \"" + text.slice(0, 50) + "\"";
  };
  const visible = (el) => {
    const style = getComputedStyle(el);
    if (style.visibility === "hidden" || style.display === "none") return false;
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const content = document.querySelector(".md-content") || document.body;
  // 1. Text cut off by a box that hides its overflow.
  for (const el of content.querySelectorAll("*")) {
    if (!visible(el) || !el.textContent.trim()) continue;
    const style = getComputedStyle(el);
    const hides = (v) => v === "hidden" || v === "clip";
    if (hides(style.overflowX) && el.scrollWidth > el.clientWidth + SLACK)
      problems.push("clipped sideways: " + describe(el));
    if (hides(style.overflowY) && el.scrollHeight > el.clientHeight + SLACK
        && el.clientHeight > 0)
      problems.push("clipped below: " + describe(el));
  }
  // 2. Text of two elements over each other.
  const boxes = [];
  const walker = document.createTreeWalker(content, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.textContent.trim() || !visible(node.parentElement)) continue;
    if (node.parentElement.closest("svg, .md-clipboard, .headerlink")) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const r of range.getClientRects())
      if (r.width > 1 && r.height > 1) boxes.push({r, el: node.parentElement});
  }
  boxes.sort((a, b) => a.r.top - b.r.top);
  for (let i = 0; i < boxes.length; i++) {
    const a = boxes[i];
    for (let j = i + 1; j < boxes.length && boxes[j].r.top < a.r.bottom; j++) {
      const b = boxes[j];
      if (a.el === b.el || a.el.contains(b.el) || b.el.contains(a.el)) continue;
      const w = Math.min(a.r.right, b.r.right) - Math.max(a.r.left, b.r.left);
      const h = Math.min(a.r.bottom, b.r.bottom) - Math.max(a.r.top, b.r.top);
      if (w > SLACK && h > Math.min(a.r.height, b.r.height) / 3)
        problems.push("overlapping text: " + describe(a.el) + " / " + describe(b.el));
    }
  }
  // 3. Images that did not load.
  for (const img of document.images)
    if (img.complete && img.naturalWidth === 0)
      problems.push("image not loaded: " + img.getAttribute("src"));
  // 4. A page wider than the window.
  const extra = document.documentElement.scrollWidth - window.innerWidth;
  if (extra > SLACK) problems.push("page " + extra + " px wider than the window");
  const out = document.createElement("pre");
  out.id = "tcpclose-check";
  out.textContent = JSON.stringify([...new Set(problems)]);
  document.body.appendChild(out);
}, 300));
</script>
"""


def find_browser() -> str | None:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, url: str, size: tuple[int, int], *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="tcpclose-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                *_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=5000",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    return done.stdout


def check_page(browser: str, page: Path, size: tuple[int, int]) -> list[str]:
    """Problems on one HTML page at one window size."""
    html = page.read_text(encoding="utf-8")
    probe = _PROBE % {"slack": SLACK}
    probed = page.with_name(f".check-{page.name}")
    probed.write_text(html.replace("</body>", probe + "</body>", 1), encoding="utf-8")
    try:
        dom = _run(browser, probed.as_uri(), size, "--dump-dom")
    finally:
        probed.unlink()
    found = re.search(r'<pre id="tcpclose-check">(.*?)</pre>', dom, re.S)
    if found is None:
        return ["the check did not run (page did not load?)"]
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    problems: list[str] = json.loads(text)
    return problems


def check_site(site: Path, browser: str, screenshots: Path | None = None) -> dict[str, list[str]]:
    """Problems per page (``page @ width``), every page at every width."""
    pages = sorted(p for p in site.rglob("index.html") if "assets" not in p.parts)
    pages += sorted(site.rglob("img/*.svg"))
    results: dict[str, list[str]] = {}
    for page in pages:
        name = str(page.relative_to(site))
        for size in WIDTHS:
            key = f"{name} @ {size[0]}px"
            if page.suffix == ".html":
                results[key] = check_page(browser, page, size)
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                shot = screenshots / (re.sub(r"[^a-z0-9]+", "_", name.lower()) + f"_{size[0]}.png")
                _run(browser, page.as_uri(), size, f"--screenshot={shot}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, help="a built site (default: build one)")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page here")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("check_pages: no Chromium found (apt-get install chromium); skipped")
        return 0
    with tempfile.TemporaryDirectory(prefix="tcpclose-site-") as tmp:
        site = args.site
        if site is None:
            site = Path(tmp) / "site"
            mkdocs = Path(sys.executable).with_name("mkdocs")
            subprocess.run(
                [str(mkdocs), "build", "--strict", "--quiet", "--site-dir", str(site)],
                cwd=ROOT,
                check=True,
                env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
            )
        results = check_site(site.resolve(), browser, args.screenshots)
    bad = {page: problems for page, problems in results.items() if problems}
    for page, problems in bad.items():
        for problem in problems:
            print(f"{page}: {problem}")
    print(f"check_pages: {len(results)} page views, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
