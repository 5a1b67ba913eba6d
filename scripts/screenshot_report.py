"""Render a Stratos report in a real browser (headless Chromium) and save a screenshot.

    python scripts/screenshot_report.py runs/NAME/report.html [--out report.png]

Needs Chromium (Debian/Ubuntu: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome).
Exits non-zero when the browser fails or the screenshot is blank, so it can gate a release.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def screenshot(report: Path, out: Path, width: int = 1200, height: int = 3000) -> Path:
    browser = find_chromium()
    if browser is None:
        sys.exit("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={out.resolve()}", report.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def ink_fraction(png: Path) -> float:
    """Share of pixels that are not white: a blank page (nothing rendered) scores ~0."""
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return float((img.min(axis=-1) < 0.95).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--height", type=int, default=3000, help="window height in pixels: how much of the page is shot")
    args = ap.parse_args()
    out = args.out or args.report.with_suffix(".png")
    screenshot(args.report, out, height=args.height)
    ink = ink_fraction(out)
    print(f"{out}: {ink:.1%} of the page has ink")
    if ink < 0.01:
        sys.exit("the screenshot is blank: the report did not render")


if __name__ == "__main__":
    main()
