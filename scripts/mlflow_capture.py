"""Open a registered model's page in the MLflow UI in headless Chromium (the DevTools
driver of ui_capture.py), check that it shows its aliases, and save a screenshot.

    mlflow_capture.py MLFLOW_URL OUT_PNG [REGISTERED_MODEL]   (default vggprice-demo)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ui_capture import Browser


def main() -> int:
    url, out = sys.argv[1].rstrip("/"), Path(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else "vggprice-demo"
    out.parent.mkdir(parents=True, exist_ok=True)
    browser = Browser()
    try:
        browser.capture(f"{url}/#/models/{name}", [name, "champion", "Version"], out)
    finally:
        browser.close()
    print(f"{name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
