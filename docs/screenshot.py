"""Take docs/app.png: headless Chromium (Debian's `chromium` package) opens the running app,
clicks Predict and captures the page, driven over the DevTools protocol.

    make demo && make app &        # a served model and the app on http://127.0.0.1:8501
    .venv/bin/python docs/screenshot.py [--url URL] [--out docs/app.png]

`chromium --headless --screenshot=...` alone captures before Streamlit has drawn anything (the
page fills in over a websocket), so this waits for the page's text instead.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import socket
import subprocess
import tempfile
import time
from typing import Any

import httpx
from PIL import Image
from websockets.sync.client import ClientConnection, connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CLICK_PREDICT = (
    "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Predict').click()"
)


class Page:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        sent = next(self.ids)
        self.ws.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def wait_for_text(self, text: str, timeout: float = 120.0) -> None:
        expression = f"document.body && document.body.innerText.includes({json.dumps(text)})"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call("Runtime.evaluate", expression=expression)["result"].get("value"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the page did not show {text!r} within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _page_socket(port: int) -> str:
    for _ in range(120):
        try:
            pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
            return next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        except (httpx.HTTPError, StopIteration):
            time.sleep(0.5)
    raise TimeoutError("chromium's DevTools endpoint did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--out", default="docs/app.png")
    parser.add_argument("--size", default="1280,1000")
    args = parser.parse_args()
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="ctcd-chromium-")
    browser = subprocess.Popen(
        ["chromium", *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
         "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with connect(_page_socket(port), max_size=None) as ws:
            page = Page(ws)
            page.call("Page.navigate", url=args.url)
            page.wait_for_text("Predict")
            page.call("Runtime.evaluate", expression=CLICK_PREDICT)
            page.wait_for_text("Predicted ")
            time.sleep(1.0)  # let the last paint settle
            shot = page.call("Page.captureScreenshot", format="png")
    finally:
        browser.terminate()
        browser.wait(timeout=20)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    image.quantize(colors=64).save(args.out, optimize=True)  # a few tens of KiB
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
