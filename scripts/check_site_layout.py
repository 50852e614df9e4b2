"""Find horizontal overflow in the built documentation site's main column, in a real browser.

Each page of a built site (``mkdocs build --site-dir DIR``) is opened in headless Chromium at a
given window width; a script in the page lists every element of the content column that sticks
out of it or scrolls sideways (a wide table, a long code line). Prints one line per finding and
exits 1 if there is any. Needs the ``chromium`` package (Debian); no Python dependency.

    python scripts/check_site_layout.py site/ --width 1280
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""<script>
window.addEventListener("load", () => {
  const column = document.querySelector(".md-content__inner");
  const found = [];
  if (column) {
    // the column's own margin (16 px) lies between it and the table of contents: an inline code span's
    // padding at a line's end may reach 4 px into it without being cut or covered
    const right = column.getBoundingClientRect().right + 4;
    const scrolls = (el) =>
      el.scrollWidth > el.clientWidth + 1 && ["auto", "scroll"].includes(getComputedStyle(el).overflowX);
    const inside = (el) => {
      for (let p = el.parentElement; p && p !== column; p = p.parentElement) if (scrolls(p)) return true;
      return false;
    };
    for (const el of column.querySelectorAll("*")) {
      const text = (el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60);
      if (scrolls(el)) {
        const excess = el.scrollWidth - el.clientWidth;
        found.push({tag: el.tagName.toLowerCase(), how: "scrolls sideways by", excess, text});
      } else if (el.getBoundingClientRect().right > right && !inside(el)
                 && !el.classList.contains("md-typeset__scrollwrap")  // its negative margin is padded back inside
                 && el.parentElement.getBoundingClientRect().right <= right) {
        found.push({tag: el.tagName.toLowerCase(), how: "sticks out by",
                    excess: Math.round(el.getBoundingClientRect().right - right), text});
      }
    }
  }
  const out = document.createElement("pre");
  out.id = "layout-probe";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""
RESULT = re.compile(r'<pre id="layout-probe">(.*?)</pre>', re.S)


def check_page(browser: str, page: Path, width: int) -> list[dict[str, object]]:
    """Elements of one page's content column that scroll sideways, or stick out of it (outermost only)."""
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as probe:
        probe.write(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    try:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--window-size={width},900",
                "--virtual-time-budget=5000",
                "--dump-dom",
                Path(probe.name).as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        Path(probe.name).unlink()
    match = RESULT.search(done.stdout)
    if match is None:
        raise RuntimeError(f"{page}: the browser returned no layout report ({done.stderr.strip()[-200:]})")
    found: list[dict[str, object]] = json.loads(html.unescape(match[1]))
    return found


def main() -> int:
    """Check every page; one line per overflowing element."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="a built site folder")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in px")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    findings = 0
    for page in sorted(args.site.rglob("index.html")):
        if "api" in page.relative_to(args.site).parts:
            continue  # generated API pages: signatures wrap as mkdocstrings renders them
        for item in check_page(args.browser, page, args.width):
            findings += 1
            print(f"{page.relative_to(args.site)}: <{item['tag']}> {item['how']} {item['excess']} px: {item['text']!r}")
    print(f"{findings} overflowing element(s) at {args.width} px", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
