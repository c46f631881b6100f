"""A Prometheus endpoint's samples as {name with labels: value}, for tests that read a daemon's metrics."""

from __future__ import annotations

import urllib.request


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
