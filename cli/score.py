"""`toss-mlx score` (per-token risk scores) and `toss-mlx select` (which tokens leave the loss)."""

from __future__ import annotations

import typer

from .common import app, friendly


@app.command("score", rich_help_panel="Step by step")
@friendly
def score(
    model: str = typer.Option(None, "--model", "-m", help="Base model: registry name "
                              "(smollm2-135m-instruct), mlx-lm or HF folder, or hub id. Loaded once "
                              "for both adapters."),
    utility: str = typer.Option(None, "--utility", "-u", help="Utility-oriented reference adapter "
                                "(mlx-lm adapter folder trained on task data)."),
    safety: str = typer.Option(None, "--safety", "-s", help="Safety-degraded reference adapter "
                               "(mlx-lm adapter folder trained on harmful data)."),
    data: str = typer.Option(None, "--data", "-d", help="The custom fine-tuning data to score "
                             "(JSONL/JSON/parquet, any format `toss-mlx train` reads)."),
    out: str = typer.Option(None, "--out", "-o", help="Scores file to write (atomically; "
                            "default scores.safetensors). Partial results live in OUT.partial/ "
                            "until it is done; run the same command again after a kill to resume."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Token budget per batch: "
                                     "samples x padded length (samples are grouped by length)."),
    template: str = typer.Option(None, "--template", help="chat (the tokenizer's chat template, "
                                 "default) or plain (the paper's 'Human: ... Assistant: ...'). "
                                 "Use what the adapters were trained with."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Truncate samples to this many "
                                    "tokens, as `toss-mlx train` does."),
    reuse_utility: str = typer.Option(None, "--reuse-utility", help="An earlier scores file of "
                                      "the same data, model and utility adapter: copy its "
                                      "loss_utility and compute only the safety side."),
    skip_bad_rows: bool = typer.Option(None, "--skip-bad-rows", help="Skip malformed rows "
                                       "(listed in the summary) instead of stopping."),
    config: str = typer.Option(None, "--config", "-c", help="YAML file with any of these "
                               "settings (and flush_seconds, fmt); flags override it."),
    overrides: list[str] = typer.Option(None, "--set", help="Override any setting: key=value, "
                                        "e.g. --set batch_tokens=2048."),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or summary (for scripts)."),
) -> None:
    """Score every response token: S = loss under the utility model - loss under the safety model.

    High S = the safety-degraded model predicts the token much better than the
    utility model (risky). Writes offsets, row_index, token_ids, response_mask,
    loss_utility, loss_safety and score, with the data's fingerprint. Under
    `mlx.launch` the rows are shared among the processes.
    """
    from toss_mlx.config import layered_settings, parse_overrides
    from toss_mlx.score import ScoreSettings, distributed_group, summary
    from toss_mlx.score import score as run_score

    flags = {"model": model, "utility": utility, "safety": safety, "data": data, "out": out,
             "batch_tokens": batch_tokens, "template": template, "max_seq_len": max_seq_len,
             "reuse_utility": reuse_utility, "skip_bad_rows": skip_bad_rows, "quiet": quiet}
    settings = layered_settings(ScoreSettings, config, parse_overrides(overrides or []),
                                flags,
                                required=("model", "utility", "safety", "data"),
                                source="score settings")
    result = run_score(settings)
    group = distributed_group()
    if not settings.quiet and (group is None or group.rank() == 0):
        typer.echo(f"{settings.out}: {summary(result)}")


@app.command("select", rich_help_panel="Step by step")
@friendly
def select(
    scores: str = typer.Option(..., "--scores", help="scores.safetensors from `toss-mlx score`."),
    ratio: float = typer.Option(0.1, "--ratio", "-r", help="Share of scored response tokens to "
                                "remove, between 0 and 1 (the paper: 0.1; its code: 0.2). "
                                "Not used by first-k."),
    out: str = typer.Option("mask.safetensors", "--out", "-o", help="Mask file to write "
                            "(atomically) for `toss-mlx train --mask`."),
    level: str = typer.Option("global", "--level", help="global: rank tokens over the whole data "
                              "set (the paper); sample: remove the ratio within each sample."),
    strategy: str = typer.Option("toss", "--strategy", help="toss (highest score S), random "
                                 "(same count, seeded), first-k (first k tokens of every answer), "
                                 "sample-filter (whole samples by mean S, same budget), "
                                 "safety-only (lowest safety-model loss), utility-only "
                                 "(highest utility-model loss)."),
    k: int = typer.Option(5, "--k", help="Tokens per answer for first-k."),
    seed: int = typer.Option(0, "--seed", help="Seed for random."),
    data: str = typer.Option(None, "--data", "-d", help="Optional: check that the scores were "
                             "made for this data file (its hash; every token with --model)."),
    model: str = typer.Option(None, "--model", "-m", help="Optional, with --data: the model whose "
                              "tokenizer re-tokenizes the data for the check."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary (for scripts)."),
) -> None:
    """Choose the response tokens that leave the loss; they stay in the input as context."""
    from toss_mlx.models.load import load_tokenizer
    from toss_mlx.select import format_summary, select_file

    tokenizer = None
    if model is not None:
        if data is None:
            raise typer.BadParameter("--model only checks the scores against --data; give both")
        tokenizer = load_tokenizer(model)
    sel = select_file(scores, out, ratio=ratio, strategy=strategy, level=level, k=k, seed=seed,
                      data=data, tokenizer=tokenizer)
    if not quiet:
        typer.echo(format_summary(sel))
        typer.echo(f"wrote {out}")
