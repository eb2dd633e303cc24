"""Shared set-up for the benchmarks: a temp store holding real Fashion-MNIST when the
Debian package is installed (else generated images), ingested and labelled."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tasks.data.fashion_mnist import DEBIAN_DIR, FILES, find_source, ingest  # noqa: E402
from tasks.data.prices import PriceRule, make_labels  # noqa: E402
from tasks.store.lake import Lake  # noqa: E402
from tasks.store.storage import LocalStore  # noqa: E402


def cpu_line() -> str:
    """The CPU and the features that decide the speed (AMX, AVX512-BF16, AVX512, AVX2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu: unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "unknown")  # fmt: skip
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))  # fmt: skip
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
    have = [f for f in wanted if f in flags]
    return f"cpu: {model}, {os.cpu_count()} cores; features: {' '.join(have) or 'none of note'}"


def prepared_store() -> tuple[Lake, str, str, str]:
    """(lake, dataset version, labels version, what the images are); prints the CPU."""
    print(cpu_line())
    root = Path(tempfile.mkdtemp(prefix="vggprice-bench-"))
    if all((DEBIAN_DIR / n).is_file() for n in FILES):
        source, what = DEBIAN_DIR, "Fashion-MNIST"
    else:
        from tests.conftest import write_idx_source

        source, what = write_idx_source(root / "idx", 12000, 2000), "generated images"
    store = Lake(LocalStore(root / "lake"))
    dv = ingest(store, find_source(source))["version"]
    lv = make_labels(store, dv, PriceRule(), seed=0)["labels_version"]
    return store, dv, lv, what
