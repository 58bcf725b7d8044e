"""`toss-mlx train`: token-masked LoRA fine-tuning (reference models, baselines, the final model)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import DTYPE_HELP, KEEP_QUANTIZED_HELP, app, friendly


@app.command("train", rich_help_panel="Step by step")
@friendly
def train(
    model: str = typer.Option(None, "--model", "-m", help="Base model: registry name "
                              "(smollm2-135m-instruct), mlx-lm or HF folder, or hub id."),
    data: str = typer.Option(None, "--data", "-d", help="Training data: JSONL/JSON/parquet with "
                             "chat 'messages', 'prompt'/'completion', 'question'/'response' or "
                             "alpaca rows."),
    out: str = typer.Option(None, "--out", "-o", help="Adapter folder to write (mlx-lm layout, "
                            "plus best/, checkpoints/, train_log.jsonl). Default: adapters."),
    mask: str = typer.Option(None, "--mask", help="mask.safetensors from `toss-mlx select`: "
                             "response tokens it removes get no loss (they stay as context). "
                             "Without it every response token is trained on (standard SFT)."),
    valid: str = typer.Option(None, "--valid", help="Validation data; the adapter with the lowest "
                              "validation loss is kept in OUT/best/."),
    init_adapter: str = typer.Option(None, "--init-adapter", help="Start from this adapter's "
                                     "weights instead of a fresh LoRA init (same rank, targets "
                                     "and layers)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the data (default 2)."),
    iters: int = typer.Option(None, "--iters", help="Number of steps (batches); overrides --epochs."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Samples per step, over all "
                                   "processes under mlx.launch (default 4)."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Steps per optimizer update (default 1)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 1e-5, the paper's)."),
    lr_schedule: str = typer.Option(None, "--lr-schedule", help="constant (default) or cosine "
                                    "(decays to 0 over the run)."),
    warmup: int = typer.Option(None, "--warmup", help="Optimizer updates of linear warmup from 0 "
                               "(default 0)."),
    rank: int = typer.Option(None, "--rank", help="LoRA rank (default 16)."),
    alpha: float = typer.Option(None, "--alpha", help="LoRA alpha; scale = alpha / rank (default 16)."),
    dropout: float = typer.Option(None, "--dropout", help="LoRA dropout (default 0)."),
    targets: str = typer.Option(None, "--targets", help="Comma-separated modules to adapt in "
                                "each layer (default q_proj,v_proj)."),
    num_layers: int = typer.Option(None, "--num-layers", help="Adapt the last N layers; -1: all "
                                   "(default)."),
    dora: bool = typer.Option(None, "--dora/--no-dora", help="DoRA instead of LoRA."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Truncate samples to this many "
                                    "tokens (default 2048)."),
    template: str = typer.Option(None, "--template", help="chat (the tokenizer's chat template, "
                                 "default) or plain (the paper's 'Human: ... Assistant: ...')."),
    loss_norm: str = typer.Option(None, "--loss-norm", help="token (default): sum over the "
                                  "batch's kept tokens / their number (the paper's equation). "
                                  "sample: mean per sample, then over samples (the official code)."),
    seed: int = typer.Option(None, "--seed", help="Seed for LoRA init, data order and dropout "
                             "(default 42)."),
    dtype: str = typer.Option(None, "--dtype", help=DTYPE_HELP),
    keep_quantized: bool = typer.Option(None, "--keep-quantized", help=KEEP_QUANTIZED_HELP),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in OUT from its last "
                                "checkpoint: same data order, same step, same optimizer state."),
    overwrite: bool = typer.Option(None, "--overwrite", help="Start over in an OUT that already "
                                   "holds a run (deletes its checkpoints, log and adapters)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with any of these "
                                "settings (and more: save_every, val_every, optimizer, "
                                "weight_decay, grad_checkpoint, dtype...); flags override it."),
    overrides: list[str] = typer.Option(None, "--set", help="Override any setting: key=value, "
                                        "e.g. --set save_every=50 --set lora.rank=8."),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or summary (for scripts)."),
) -> None:
    """Fine-tune a model with LoRA on the response tokens a mask keeps (all, without --mask)."""
    from toss_mlx.config import parse_overrides
    from toss_mlx.train import load_settings
    from toss_mlx.train import train as run_training

    settings = load_settings(
        str(config) if config else None, parse_overrides(overrides or []),
        model=model, data=data, out=out, mask=mask, valid=valid, init_adapter=init_adapter,
        epochs=epochs, iters=iters,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule,
        warmup=warmup, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
        num_layers=num_layers, dora=dora, max_seq_len=max_seq_len, template=template,
        loss_norm=loss_norm, seed=seed, dtype=dtype, keep_quantized=keep_quantized,
        resume=resume, overwrite=overwrite, quiet=quiet)
    result = run_training(settings)
    if not settings.quiet and result.model is not None:
        typer.echo(result.summary())
