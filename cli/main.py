"""Entry point: collects the commands of each cli/ module into one Typer app."""

from __future__ import annotations

# Each cli/ module registers its commands on `app` when imported.
from . import (
    eval_report,  # noqa: F401
    export,  # noqa: F401
    model,  # noqa: F401
    pipeline,  # noqa: F401
    score,  # noqa: F401
    train,  # noqa: F401
)
from .common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
