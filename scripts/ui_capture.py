"""Open vggprice's artifacts in the Prefect UI in headless Chromium, check that every
image in them loaded, and save a full-page screenshot of each (used by
scripts/ui-screenshot, which starts and stops the server).

    ui_capture.py API_URL OUT_DIR
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

# What a rendered report must show (text), per artifact kind.
EXPECTED = {"eval": ["Evaluation of", "noise floor", "reference recipe", "mean train price"],
            "train": ["Training", "val loss", "images/s"],
            "drop": ["priced by", "rejection reason"]}  # fmt: skip
# Shown only when the artifact's markdown has it (a drop with no rejected file has no
# rejection table): not waited for otherwise.
OPTIONAL = {"drop": {"rejection reason"}}

IMAGES_JS = """(() => {
  const imgs = Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('data:')
      || i.closest('.artifact-description, .markdown, [class*=markdown]'));
  return JSON.stringify({text: document.body.innerText.slice(0, 20000),
    images: imgs.map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                            width: i.naturalWidth}))});
})()"""


def latest_artifacts(api: str) -> dict[str, tuple[str, str]]:
    """kind -> (id, markdown) of the newest markdown artifact of that kind (eval-,
    train-, drop-)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        found: dict[str, tuple] = {}
        for a in client.read_artifacts():
            if a.type != "markdown" or not a.key:
                continue
            # keys: <store>-<hash>-<kind>-..., or <store>-<hash>-<line>-<kind>-...
            kind = next((k for k in EXPECTED if f"-{k}-" in f"-{a.key}-"), None)
            if kind in EXPECTED and (kind not in found or a.created > found[kind][0]):
                found[kind] = (a.created, str(a.id), str(a.data or ""))
    return {kind: (aid, text) for kind, (_, aid, text) in found.items()}


def expected_texts(kind: str, markdown: str) -> list[str]:
    """What the rendered artifact must show: its kind's texts, less the optional ones
    its markdown does not hold."""
    optional = OPTIONAL.get(kind, set())
    return [t for t in EXPECTED[kind] if t not in optional or t in markdown]


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="vggprice-chromium-")
        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(p for p in pages if p["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def capture(self, url: str, expected: list[str], out: Path) -> list[dict]:
        """Open ``url``, wait for the texts, check the images, save a full-page PNG."""
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.call("Page.navigate", url=url)
        state: dict = {}
        for _ in range(120):
            time.sleep(0.5)
            value = self.call("Runtime.evaluate", expression=IMAGES_JS)["result"].get("value")
            state = json.loads(value) if value else {}
            text = state.get("text", "")
            if all(t in text for t in expected) and all(i["loaded"] for i in state["images"]):
                break
        missing = [t for t in expected if t not in state.get("text", "")]
        if missing:
            raise SystemExit(f"{url} does not show {missing}")
        # The UI scrolls inside a container: make the window as tall as the tallest one.
        tallest = "Math.max(...Array.from(document.querySelectorAll('*'), e => e.scrollHeight))"
        height = self.call("Runtime.evaluate", expression=tallest)["result"]["value"] + 100
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=int(height),
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        time.sleep(1)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return state["images"]

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait()


def main() -> int:
    api, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    ui = api.removesuffix("/api")
    found = latest_artifacts(api)
    if "eval" not in found:
        print(
            "no evaluation report in this Prefect database: run scripts/run first", file=sys.stderr
        )
        return 1
    browser, failed = Browser(), False
    try:
        for kind, (artifact_id, markdown) in sorted(found.items()):
            out = out_dir / f"{kind}-report.png"
            url = f"{ui}/artifacts/artifact/{artifact_id}"
            images = browser.capture(url, expected_texts(kind, markdown), out)
            bad = [i["alt"] for i in images if not i["loaded"]]
            print(f"{kind}: {len(images) - len(bad)}/{len(images)} images loaded -> {out}")
            if bad or not images:
                print(f"{kind}: images not loaded: {bad or 'none found'}", file=sys.stderr)
                failed = True
    finally:
        browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
