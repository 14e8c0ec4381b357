"""A real browser opens report.html: headless Chromium (Debian's `chromium`; `make test` installs it where it
can) loads the file offline and a checker script counts rendered images and tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100);
  document.body.setAttribute('data-check', JSON.stringify({
    images: imgs.length, rendered: ok.length, tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tbody tr').length, width: document.body.scrollWidth}));
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian package 'chromium'; "
                    "`make test` installs it when run as root) - the browser check of report.html did not run")
def test_report_renders_in_headless_chromium(sweep_dir, tmp_path):
    page = tmp_path / "report.html"
    page.write_text((sweep_dir / "private" / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r"data-check=\"([^\"]+)\"", out.stdout)
    assert m, f"the page did not finish loading in Chromium: {out.stderr[-2000:]}"
    check = json.loads(m.group(1).replace("&quot;", '"'))
    assert check["images"] == 6 and check["rendered"] == 6, check  # no broken image
    assert check["tables"] >= 8 and check["rows"] >= 40, check
