"""Time the GGUF exports of SmolLM2-135M-Instruct + a LoRA and record file sizes and logit checks.

    python bench/gguf_export.py [--out bench/results/gguf_export.json]

For each format (gguf f16 / q8_0 / q4_k_m, gguf-lora, ollama): wall time of the whole
export (load, fuse, write, read-back check), file sizes, and the read-back max
|logit difference| against the float fused model. With llama-cpp-python installed it
also runs each fused file in llama.cpp and records its max |logit difference| from MLX.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import toss_mlx  # noqa: E402,F401  (BLAS before mlx)


def cpp_logits(model_path: Path, lora: Path | None, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=None if lora is None else str(lora),
                n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def main() -> None:
    import mlx.core as mx
    from adapters import make_adapter, mlx_logits

    from toss_mlx.export_gguf import CHECK_TEXT, export_gguf
    from toss_mlx.models.load import load_model
    from toss_mlx.models.registry import pull

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/gguf_export.json")
    args = parser.parse_args()

    model = pull("smollm2-135m-instruct")
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    runs = [("gguf", "f16"), ("gguf", "q8_0")] + ([("gguf", "q4_k_m")] if has_llama_cpp else []) \
        + [("gguf-lora", "f16"), ("ollama", "q8_0")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = make_adapter(model, root / "adapter", num_layers=8, rank=8, alpha=16.0,
                               targets=("q_proj", "k_proj", "v_proj", "down_proj"), amplitude=0.05)
        reference, tokenizer = load_model(str(model), adapter_path=str(adapter), quiet=True)
        tokens = tokenizer.encode(CHECK_TEXT)[:32]
        expected = mlx_logits(reference, tokens)
        for fmt, quant in runs:
            start = time.perf_counter()
            result = export_gguf(adapter, root / f"{fmt}-{quant}", fmt=fmt, model=str(model), quant=quant)
            seconds = time.perf_counter() - start
            row = {"format": fmt, "quant": result.quant, "seconds": round(seconds, 1),
                   "files": result.files, "readback_max_logit_diff": result.max_logit_diff,
                   "readback_top1": result.top1_agreement}
            gguf_files = [n for n in result.files if n.startswith("model-")]
            if has_llama_cpp and gguf_files:
                got = cpp_logits(root / f"{fmt}-{quant}" / gguf_files[0], None, tokens)
                row["llama_cpp_max_logit_diff"] = float(np.abs(got - expected).max())
                row["llama_cpp_top1"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
            if has_llama_cpp and fmt == "gguf-lora":
                from mlx_lm.utils import load

                from toss_mlx.export_gguf import write_model_gguf
                from toss_mlx.models.registry import source_file

                base, _, config = load(str(model), return_config=True)
                write_model_gguf(root / "base-f16.gguf", base, config, model, "f16", "base", "bench")
                for label, base_file in (("f16 base", root / "base-f16.gguf"),
                                         ("wheel's Q4_1 base", source_file("smollm2-135m-instruct"))):
                    got = cpp_logits(base_file, root / f"{fmt}-{quant}" / "adapter.gguf", tokens)
                    row[f"llama_cpp_max_logit_diff_on_{label}"] = float(np.abs(got - expected).max())
            rows.append(row)
            print(json.dumps(row))
    record = {"machine": f"{platform.system()} {platform.machine()}, {__import__('os').cpu_count()} cores",
              "mlx": mx.__version__, "logit_spread_std": float(expected.std()), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
