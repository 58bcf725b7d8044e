"""`toss-mlx eval` (safety and utility of the base and adapters) and `toss-mlx report` (the HTML report)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import DTYPE_HELP, KEEP_QUANTIZED_HELP, app, friendly


@app.command("eval", rich_help_panel="Results")
@friendly
def eval_command(
    model: str = typer.Option(None, "--model", "-m",
                              help="Base model: registry name, mlx-lm folder or hub id."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a",
        help="NAME=DIR of an mlx-lm adapter folder to evaluate next to the base; repeatable."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the bare base model out."),
    harmful: list[str] = typer.Option(
        [], help="Harmful prompts (JSONL/JSON): refusal rate, attack success rate. FILE or NAME=FILE; "
                 "repeatable: every set is reported apart, the first carries the headline numbers."),
    benign: Path = typer.Option(
        None, help="Benign prompts with reference answers: NLL/perplexity, and exact match on `#### N`."),
    edgy: Path = typer.Option(None, help="Benign-but-edgy prompts: over-refusal rate."),
    max_new_tokens: int = typer.Option(None, help="Tokens generated per answer (default: 128)."),
    decode: str = typer.Option(
        None, help="greedy (default) or sample: the paper's top_p 0.9, temperature 1.0, "
                   "repetition penalty 1.2, seeded."),
    seed: int = typer.Option(None, help="Seed of the sampling (default: 0)."),
    template: str = typer.Option(
        None, help="chat (the model's chat template, default) or plain ('Human: ...\\nAssistant: ')."),
    judge: str = typer.Option(
        None, help="An mlx-lm chat model that rates each harmful answer 1-5 (mean and share at 5)."),
    batch_size: int = typer.Option(None, help="Answers decoded together (default: 16)."),
    max_prompts: int = typer.Option(None, help="Use the first N prompts of each file (default: all)."),
    dtype: str = typer.Option(None, "--dtype", help=DTYPE_HELP),
    keep_quantized: bool = typer.Option(None, "--keep-quantized", help=KEEP_QUANTIZED_HELP),
    prefill_harmful: Path = typer.Option(
        None, help="Harmful prompt + answer pairs (any training format): prefilling attack, "
                   "harmful-answer NLL and KL to the base by answer position."),
    prefill_tokens: str = typer.Option(
        None, help="Answer tokens prefilled, comma-separated (default: 5,10,20)."),
    prefill_decode: str = typer.Option(
        None, help="greedy (default) or sample: Qi et al.'s top_p 0.6, temperature 0.9, seeded."),
    depth_buckets: str = typer.Option(
        None, help="Ends of the answer-position buckets (default: 5,20,80 = 1-5, 6-20, 21-80, 81+)."),
    depth_max_tokens: int = typer.Option(
        None, help="Answer tokens the NLL and KL read (default: 160; 0: whole answers)."),
    config: Path = typer.Option(None, "--config", "-c",
                                help="YAML of eval settings (model, adapters, harmful, benign, edgy, decode, top_p, ...); flags win."),
    overrides: list[str] = typer.Option(None, "--set", help="Override any eval setting: "
                                        "key=value, e.g. --set top_p=0.95."),
    out: Path = typer.Option(Path("eval.json"), "--out", "-o", help="Where to write eval.json."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
):
    """Evaluate the base model and adapters side by side on the same prompts.

    Safety (refusal and attack success rates with Wilson 95% intervals, optional judge),
    over-refusal on benign-but-edgy prompts, and utility (NLL, exact match)."""
    from toss_mlx.config import layered_settings, parse_overrides
    from toss_mlx.evaluate import EvalSettings, evaluate, metrics_table, parse_adapters
    from toss_mlx.evaluate.depth import parse_harmful

    first_harmful, harmful_name, harmful_sets = parse_harmful(harmful)
    flags = {
        "model": model, "harmful": first_harmful, "harmful_name": harmful_name,
        "harmful_sets": harmful_sets or None, "prefill_harmful": prefill_harmful and str(prefill_harmful),
        "prefill_tokens": prefill_tokens, "prefill_decode": prefill_decode,
        "depth_buckets": depth_buckets, "depth_max_tokens": depth_max_tokens, "benign": benign and str(benign),
        "edgy": edgy and str(edgy), "max_new_tokens": max_new_tokens, "decode": decode,
        "seed": seed, "template": template, "judge": judge, "batch_size": batch_size,
        "max_prompts": max_prompts, "dtype": dtype, "keep_quantized": keep_quantized,
        "adapters": parse_adapters(adapter) or None, "include_base": False if no_base else None,
    }
    from toss_mlx.checks import integer

    if max_prompts is not None:
        integer(max_prompts, "--max-prompts", 1)  # 0 would mean "all" in the settings
    settings = layered_settings(EvalSettings, config, parse_overrides(overrides or []),
                                flags, source="eval")
    result = evaluate(settings, out, quiet=quiet)
    if not quiet:
        from rich.console import Console

        Console().print(metrics_table(result))
        typer.echo(f"wrote {out} ({len(result['models'])} models; every answer and verdict inside)")


@app.command("report", rich_help_panel="Results")
@friendly
def report_command(
    run_dir: Path = typer.Argument(None, help="A run directory (scores, mask and eval*.json inside)."),
    scores: Path = typer.Option(None, help="scores.safetensors from `toss-mlx score`."),
    mask: Path = typer.Option(None, help="mask.safetensors from `toss-mlx select` (removed tokens)."),
    data: Path = typer.Option(None, help="The data file the scores were made from (checked; row tags)."),
    eval_file: list[Path] = typer.Option([], "--eval", help="eval.json files to chart; repeatable."),
    model: str = typer.Option(None, "--model", "-m",
                              help="Model whose tokenizer decodes the tokens (default: the scores' model)."),
    top: int = typer.Option(20, help="Riskiest samples shown in the heatmap."),
    random_samples: int = typer.Option(20, "--random", help="Other samples drawn at random for the heatmap."),
    seed: int = typer.Option(0, help="Seed of the random sample."),
    title: str = typer.Option("TOSS report", help="Page title."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
):
    """Write one self-contained HTML report of a run or of scores and a mask.

    Token heatmap, score histogram with the threshold, removal by response position,
    and the safety-utility chart of the evaluations."""
    from toss_mlx.report import build_report, report_inputs

    inputs = report_inputs(run_dir, scores=scores, mask=mask, data=data, evals=list(eval_file),
                           model=model)
    summary = build_report(inputs, out, top=top, random_n=random_samples, seed=seed, title=title)
    if not quiet:
        parts = [f"{k.replace('_', ' ')} {v:,}" for k, v in summary.items() if k != "bytes"]
        typer.echo(f"wrote {out} ({summary['bytes'] / 1024:.0f} KiB): " + ", ".join(parts))
