"""`toss-mlx run`, `toss-mlx init` and `toss-mlx refine`: the whole method, and TOSS-Pro alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import app, friendly
from .train_flags import settings_from, train_flags


@app.command("run", rich_help_panel="The whole method")
@friendly
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see `toss-mlx init`, recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. "
                                   "--set toss.ratio=0.2 (repeatable)."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>). "
                             "Running again skips stages whose inputs are unchanged."),
    until: str = typer.Option(None, "--until", help="Stop after this stage (prepare, utility, "
                              "safety, refine, score, select, final, eval, report, export)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final summary."),
) -> None:
    """Run TOSS (or TOSS-Pro) end to end from one recipe, resumably."""
    from toss_mlx.pipeline import run as run_recipe
    from toss_mlx.pipeline import summary_text

    result = run_recipe(recipe, set_, out, until, say=(lambda m: None) if quiet else print)
    typer.echo(summary_text(result))


@app.command("init", rich_help_panel="The whole method")
@friendly
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the starter recipe."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter recipe."""
    from toss_mlx.pipeline import write_starter

    write_starter(path, force)
    typer.echo(f"wrote {path}; edit it, then: toss-mlx run {path}")


@app.command("refine", rich_help_panel="Step by step")
@friendly
@train_flags
def refine(
    model: str = typer.Option(..., "--model", "-m", help="Base model (registry name, folder or hub id)."),
    data: str = typer.Option(..., "--data", "-d", help="The custom data D to score."),
    harmful: str = typer.Option(..., "--harmful", help="The starting harmful set D_h."),
    utility: str = typer.Option(..., "--utility", help="Utility-oriented adapter (stays fixed)."),
    rounds: int = typer.Option(None, "--rounds", "-T", help="Refinement rounds (default 2)."),
    k: int = typer.Option(None, "--k", help="Samples of D added to the harmful set per round "
                          "(default 10)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for round-t/ artifacts and rounds.json."),
    safety: str = typer.Option(None, "--safety", help="Round-0 safety adapter; default: train one "
                               "on --harmful."),
    retrain: str = typer.Option(None, "--retrain", help="scratch: retrain each round from the "
                                "base (default); continue: from the previous adapter."),
    ratio: float = typer.Option(None, "--ratio", help="d used to report how the top-d token set "
                                "moves between rounds (default 0.1)."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Scorer's token budget per "
                                     "batch (default 4096)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    train_flags: dict[str, Any] | None = None,
) -> None:
    """TOSS-Pro: grow the harmful set with the riskiest custom samples and retrain the safety model.

    The safety models are trained as `toss-mlx train` trains (the same flags: --epochs,
    --iters, --lr, --rank, --format, --config, --set ...).
    """
    from rich.console import Console

    from toss_mlx.refine import RefineSettings, refine, rounds_table

    train = settings_from(train_flags or {}, model=model, data=harmful, quiet=quiet)
    given = {name: value for name, value in dict(rounds=rounds, k=k, safety=safety, retrain=retrain,
                                                 ratio=ratio, batch_tokens=batch_tokens).items()
             if value is not None}  # the rest: RefineSettings' defaults
    result = refine(RefineSettings(data=data, harmful=harmful, utility=utility, out=out, train=train,
                                   quiet=quiet, **given))
    Console().print(rounds_table(result))
    typer.echo(f"final safety adapter: {result.final_safety}; scores: {result.final_scores} "
               f"(next: toss-mlx select --scores {result.final_scores})")
