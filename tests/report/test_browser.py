"""A real browser opens report.html: headless Chromium (Debian's `chromium`; `make test` installs it where it
can) loads the file offline and a checker script counts rendered images and tables and checks where the answer sits: the
summary's sentences and the headline plot above the first table."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from dptrain.report.plots import HEADLINE

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100);
  const top = el => el ? el.getBoundingClientRect().top + window.scrollY : -1;
  const items = Array.from(document.querySelectorAll('#findings li'));
  const first = imgs[0];
  document.body.setAttribute('data-check', JSON.stringify({
    images: imgs.length, rendered: ok.length, tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tbody tr').length, width: document.body.scrollWidth,
    summary: top(document.getElementById('summary')), findings: items.length,
    findings_shown: items.filter(li => li.getBoundingClientRect().height > 0).length,
    findings_bottom: Math.max(...items.map(li => li.getBoundingClientRect().bottom + window.scrollY)),
    first_image: first ? first.alt : null, first_image_top: top(first),
    first_image_rendered: ok.includes(first), first_table: top(document.querySelector('table'))}));
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
    assert check["images"] == 7 and check["rendered"] == 7, check  # no broken image
    assert check["tables"] >= 8 and check["rows"] >= 40, check
    # the answer first: the summary's sentences, then the headline plot (drawn), then the first table
    assert check["findings"] >= 5 and check["findings_shown"] == check["findings"], check
    assert check["first_image"] == HEADLINE and check["first_image_rendered"], check
    assert 0 <= check["summary"] < check["findings_bottom"] <= check["first_image_top"] < check["first_table"], check
