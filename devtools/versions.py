"""Print the versions a run uses: Python, the test servers and the libraries that carry updates."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

from devtools.devserver import redis_server_binary

PACKAGES = ("celery", "kombu", "redis", "pymongo", "mongoengine", "secantusdb", "ruff", "mypy", "pytest")


def redis_server_version() -> str:
    """``redis-server --version``'s ``v=`` field, and which binary answered."""
    binary = redis_server_binary()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    field = next((f for f in out.split() if f.startswith("v=")), "v=unknown")
    return f"{field[2:]} ({binary})"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def lines() -> list[str]:
    rows = [("python", platform.python_version()), ("redis-server", redis_server_version())]
    rows += [(name, package_version(name)) for name in PACKAGES]
    return [f"{name:<13} {value}" for name, value in rows]


if __name__ == "__main__":
    print("\n".join(lines()))
