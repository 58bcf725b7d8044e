"""Entry point: collects the commands of each cli/ module into one Typer app."""

from __future__ import annotations

import importlib

from .common import app

# Each cli/ module registers its commands on `app` when imported; this order is the
# order of `toss-mlx --help`: the steps, the whole method, results, setup.
for _module in ("train", "score", "pipeline", "eval_report", "export", "model"):
    importlib.import_module(f"{__package__}.{_module}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
