"""`toss-mlx export` (adapter to mlx-lm, PEFT or GGUF layouts) and `toss-mlx fuse` (adapter into the model)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import app, friendly


@app.command("export", rich_help_panel="Results")
@friendly
def export(
    adapter: Path = typer.Argument(..., help="mlx-lm adapter folder (adapter_config.json + "
                                   "adapters.safetensors), e.g. the output of `toss-mlx train`."),
    fmt: str = typer.Option("mlx", "--format", "-f",
                            help="mlx: mlx-lm's layout (mlx_lm.load / mlx_lm.generate "
                            "--adapter-path). peft: a PEFT LoRA folder for transformers, vLLM, "
                            "llama.cpp's convert_lora_to_gguf.py and Ollama. gguf: the base "
                            "fused with the adapter as one GGUF (llama.cpp, LM Studio). "
                            "gguf-lora: the adapter as a llama.cpp LoRA GGUF (llama-server "
                            "--lora). ollama: the fused GGUF with a Modelfile."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced atomically "
                             "if it holds an earlier export; any other non-empty folder is refused)."),
    base_model_id: str = typer.Option(None, "--base-model-id",
                                      help="Base model id for the README and PEFT's "
                                      "base_model_name_or_path (default: the one the adapter records)."),
    model: str = typer.Option(None, "--model", "-m", help="GGUF formats: the base model the "
                              "adapter was trained on (default: the one the adapter records)."),
    quant: str = typer.Option("f16", "--quant", help="gguf / ollama: f16, q8_0 or q4_k_m "
                              "(q4_k_m needs llama-cpp-python, llama.cpp's own quantizer)."),
    system: str = typer.Option(None, "--system", help="ollama: the Modelfile's SYSTEM prompt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Export an adapter with a README that says how it was trained and how to load it."""
    from toss_mlx.export import export_adapter

    result = export_adapter(adapter, out, fmt=fmt, base_model_id=base_model_id, model=model,
                            quant=quant, system_prompt=system)
    if fmt not in ("mlx", "peft"):
        if not quiet:
            files = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in result.files.items())
            check = "" if result.max_logit_diff is None else (
                f"; read-back max |logit difference| {result.max_logit_diff:.4f}")
            typer.echo(f"exported {fmt} ({result.arch}, {result.quant}) to {out}: {files}{check}")
            for note in result.notes:
                typer.echo(f"note: {note}")
        return
    if not quiet:
        kind = "DoRA" if result.dora else "LoRA"
        typer.echo(f"exported {kind} adapter ({len(result.modules)} modules, rank {result.rank}) "
                   f"as {fmt} to {out}")


@app.command("fuse", rich_help_panel="Results")
@friendly
def fuse(
    model: str = typer.Option(..., "--model", "-m", help="Base model: registry name, mlx-lm "
                              "folder or hub id (the one the adapter was trained on)."),
    adapter: Path = typer.Option(..., "--adapter", "-a", help="mlx-lm adapter folder to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (config, weights, "
                             "tokenizer), loadable by mlx_lm.load."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights even when "
                                    "the base is quantized (default: requantize like the base)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Merge an adapter into its base model and write an mlx-lm model folder."""
    from toss_mlx.fuse import fuse_adapter

    result = fuse_adapter(model, adapter, out, dequantize=dequantize)
    if not quiet:
        typer.echo(f"fused {result.fused_modules} modules into {out} "
                   f"({'quantized' if result.quantized else 'float weights'})")
