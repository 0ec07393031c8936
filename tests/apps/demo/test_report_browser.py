"""The demo report in a real browser: headless Chromium (Debian's `chromium`, which `make test`
installs when it can) renders the quick report at a phone and a laptop width.

What a browser tells us that parsing the HTML cannot: every embedded PNG decodes (img.complete with
a natural size), the page does not scroll sideways on a phone, every section's heading is in the
rendered DOM, and the screenshots show the figures themselves (each figure's box in the screenshot
correlates with the embedded PNG). The laptop screenshot is copied to $DIFFLAB_SCREENSHOT_DIR/
report.png when that is set (the README's docs/images/report.png)."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
# without the networking flags Chromium tries Google's hosts at every start; a fresh profile each run
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")
WIDTHS = {"phone": 390, "laptop": 1280}
HEIGHT = 2400
PNG_URI = "data:image/png;base64,"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (no `chromium` on PATH, no "
                       "/usr/bin/chromium); `make browser` installs Debian's chromium when run as root"),
]

# The probe page holds the report once per width in a srcdoc iframe of exactly that width (a headless
# window is at least 500 px wide, an iframe can be narrower), and on load writes what the browser
# laid out into <pre id=probe> as JSON, which --dump-dom prints.
PROBE_SCRIPT = """<script>addEventListener("load", () => {
  const out = {};
  for (const frame of document.querySelectorAll("iframe")) {
    const doc = frame.contentDocument, root = doc.documentElement;
    out[frame.name] = {
      viewport: root.clientWidth, scroll_width: root.scrollWidth,
      h2: [...doc.querySelectorAll("h2")].map(h => h.textContent),
      sections: [...doc.querySelectorAll("section")].map(s => s.id),
      images: [...doc.images].map(img => {
        const r = img.getBoundingClientRect();
        return {complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
                box: [r.left, r.top, r.width, r.height]};
      }),
    };
  }
  document.getElementById("probe").textContent = JSON.stringify(out);
});</script>"""


def run_chromium(workdir: Path, *args: str) -> str:
    """Run headless Chromium with a fresh profile; returns stdout (the DOM for --dump-dom)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def screenshot(report: Path, width: int, out: Path) -> Image.Image:
    """The report rendered in a width × HEIGHT viewport, as an RGB image."""
    run_chromium(out.parent, f"--screenshot={out}", f"--window-size={width},{HEIGHT}", report.as_uri())
    assert out.is_file(), f"chromium wrote no screenshot {out}"
    return Image.open(out).convert("RGB")


def probe_layout(report: Path, workdir: Path) -> dict:
    """{"phone"|"laptop": {viewport, scroll_width, h2, sections, images: [{complete, natural, box}]}}
    as laid out by Chromium, box = [left, top, width, height] in CSS px of that width's viewport."""
    doc = html.escape(report.read_text(), quote=True)
    frames = "".join(f'<iframe name={name} width={width} height={HEIGHT} style="border:0;display:block" '
                     f'srcdoc="{doc}"></iframe>' for name, width in WIDTHS.items())
    page = workdir / "probe.html"
    page.write_text(f'<!doctype html><meta charset="utf-8"><body style="margin:0">{frames}'
                    f'<pre id="probe"></pre>{PROBE_SCRIPT}</body>')
    dom = run_chromium(workdir, f"--window-size={max(WIDTHS.values()) + 20},{HEIGHT}", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the probe script did not run"
    return json.loads(html.unescape(found.group(1)))


class _Resources(HTMLParser):
    """Every img src, every src/href that would load something (external resources), and the
    <meta name=viewport> content (without it a phone lays the page out 980 px wide and shrinks it)."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.viewport = ""

    def handle_starttag(self, tag, attrs):
        if tag == "meta" and dict(attrs).get("name") == "viewport":
            self.viewport = dict(attrs).get("content") or ""
        for name, value in attrs:
            if tag == "img" and name == "src":
                self.images.append(value)
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.external.append(f"<{tag} {name}={value}>")


def embedded_sources(report: Path) -> list[str]:
    """The report's img sources (in page order); asserts each is an inline PNG, nothing is linked,
    and the page asks phones for their own width."""
    parser = _Resources()
    parser.feed(report.read_text())
    assert not parser.external, f"the report links resources instead of embedding them: {parser.external}"
    assert all(src.startswith(PNG_URI) for src in parser.images), "an <img> whose src is not an inline PNG"
    assert "width=device-width" in parser.viewport, "no <meta name=viewport content=width=device-width>"
    return parser.images


def decode(source: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(source[len(PNG_URI):])))


def on_white(image: Image.Image) -> Image.Image:
    """Grayscale, transparent parts over white (as the page shows them)."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")


def painted_correlation(shot: Image.Image, image: Image.Image, box) -> float:
    """Pearson correlation between the screenshot inside `box` and the embedded PNG scaled to it."""
    left, top, width, height = (round(v) for v in box)
    seen = np.asarray(on_white(shot.crop((left, top, left + width, top + height))), np.float64)
    expected = np.asarray(on_white(image).resize((width, height), Image.Resampling.BOX), np.float64)
    return float(np.corrcoef(seen.ravel(), expected.ravel())[0, 1])


def check_report_in_browser(folder: Path, workdir: Path) -> dict[str, Path]:
    """All the browser checks on folder/report.html; returns the screenshots' paths by width name."""
    report = folder / "report.html"
    summary = json.loads((folder / "report.json").read_text())
    titles = [summary["titles"][key][0] for key in summary["sections"]]
    sources = embedded_sources(report)
    assert sources, "the report has no figures"
    layout = probe_layout(report, workdir)
    for name, width in WIDTHS.items():
        seen = layout[name]
        assert seen["viewport"] == width, f"laid out {seen['viewport']} px wide instead of {width}"
        # every section is in the rendered page, in order, under its title
        assert seen["sections"] == list(summary["sections"]), f"rendered sections {seen['sections']}"
        assert seen["h2"] == titles, f"rendered headings {seen['h2']}, expected {titles}"
        # every embedded PNG decoded by the browser; nothing wider than the screen
        assert len(seen["images"]) == len(sources)
        for img in seen["images"]:
            assert img["complete"] and min(img["natural"]) > 0, f"broken image at {name} width: {img}"
            assert 0 <= img["box"][0] <= img["box"][0] + img["box"][2] <= width + 0.5, f"image off screen: {img}"
        assert seen["scroll_width"] <= width, f"the page scrolls sideways at {width} px"
    images = [decode(source) for source in sources]
    shots = {}
    for name, width in WIDTHS.items():
        # the screenshot: the requested size, not blank, and each figure painted where it was laid out
        shots[name] = workdir / f"report-{name}.png"
        shot = screenshot(report, width, shots[name])
        assert shot.size == (width, HEIGHT)
        assert (np.asarray(shot.convert("L")) < 200).mean() > 0.02, f"the {name} screenshot is (nearly) blank"
        visible = [(img, png) for img, png in zip(layout[name]["images"], images)
                   if img["box"][1] + img["box"][3] <= HEIGHT and min(img["box"][2:]) >= 24]
        assert visible, f"no figure inside the first {HEIGHT} px at {name} width"
        for img, png in visible:
            assert img["natural"] == list(png.size), f"the browser decoded {img['natural']}, PIL {png.size}"
            correlation = painted_correlation(shot, png, img["box"])
            # measured: 0.75 (a plot shrunk 3× on the phone) to 1.0 in place; <= 0.37 moved by 3 px
            assert correlation > 0.6, f"figure at {img['box']} not painted in the {name} screenshot ({correlation:.2f})"
    return shots


def test_quick_report_renders_in_headless_chromium(quick_demo_dir, tmp_path):
    shots = check_report_in_browser(quick_demo_dir, tmp_path)
    if os.environ.get("DIFFLAB_SCREENSHOT_DIR"):
        folder = Path(os.environ["DIFFLAB_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots["laptop"], folder / "report.png")
