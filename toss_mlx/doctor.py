"""`toss-mlx doctor`: is this machine ready for toss-mlx, and how fast will it be?

Each check gives one finding: ok, a warning (works, but slower or missing an
optional part; the hint says how to fix it) or an error (something needed is
missing). The report's status is 1 when any error was found, else 0. Nothing
here imports mlx before it is known to be installed, so the report also works
on a broken install.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import blas

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Finding:
    label: str
    value: str
    level: str = "ok"  # "ok" | "warning" | "error"
    hint: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> int:
        return 1 if any(f.level == "error" for f in self.findings) else 0

    def text(self) -> str:
        width = max(len(f.label) for f in self.findings)
        lines = []
        for f in self.findings:
            mark = {"ok": "", "warning": "  [warning]", "error": "  [error]"}[f.level]
            lines.append(f"{f.label:<{width}}  {f.value}{mark}")
            if f.hint:
                lines.append(f"{'':<{width}}  -> {f.hint}")
        warned = any(f.level == "warning" for f in self.findings)
        lines.append("not ready: fix the errors above" if self.status else
                     "ready, with the warnings above" if warned else "ready")
        return "\n".join(lines)


def doctor() -> Report:
    """Check this machine: platform, Python, MLX and its device, BLAS speed, memory, models."""
    report = Report([
        Finding("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
        Finding("python", platform.python_version()),
    ])
    mx = _import_mlx(report)
    report.findings.append(_package("mlx-lm", "mlx_lm", "pip install mlx-lm"))
    report.findings.append(blas_finding())
    if mx is not None:
        device = mx.default_device().type.name
        gflops = matmul_gflops(mx)
        report.findings.append(Finding("matmul", f"{gflops:.1f} GFLOP/s (fp32 1024x1024 on {device})"))
    report.findings.append(memory_finding())
    if mx is not None:
        report.findings.extend(model_findings())
    return report


def _import_mlx(report: Report):
    try:
        import mlx.core as mx
    except ImportError as e:
        extra = "'mlx[cpu]'" if sys.platform.startswith("linux") else "mlx"
        report.findings.append(Finding("mlx", f"not importable ({e})", "error", f"pip install {extra}"))
        return None
    device = mx.default_device().type.name
    gpu = "Metal" if mx.metal.is_available() else "CUDA" if _cuda_available(mx) else "none"
    report.findings.append(Finding("mlx", f"{mx.__version__}, default device {device}, GPU: {gpu}"))
    return mx


def _cuda_available(mx) -> bool:
    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def _package(label: str, module: str, fix: str) -> Finding:
    try:
        __import__(module)
    except ImportError as e:
        return Finding(label, f"not importable ({e})", "error", fix)
    return Finding(label, importlib.metadata.version(label))


def blas_finding() -> Finding:
    """Which BLAS MLX's CPU matmuls use (see toss_mlx.blas)."""
    path, reason = blas.status
    if not sys.platform.startswith("linux"):
        return Finding("blas", f"MLX's own ({reason})")
    if path is not None:
        return Finding("blas", f"OpenBLAS, {path}")
    if reason.startswith("disabled"):
        fix = f"unset {blas.ENV_VAR} to use OpenBLAS"
    elif reason.startswith("mlx.core was imported"):
        fix = "import toss_mlx before anything imports mlx"
    elif shutil.which("apt-get"):
        fix = "sudo apt-get update && sudo apt-get install -y libopenblas0-pthread"
    else:
        fix = f"install OpenBLAS with your package manager, or set {blas.ENV_VAR}=/path/to/libopenblas.so"
    return Finding("blas", f"reference BLAS, 15-30x slower on CPU ({reason})", "warning", fix)


def matmul_gflops(mx, n: int = 1024, repeats: int = 5) -> float:
    """Median GFLOP/s of an fp32 n x n matmul on the default device."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)  # warm up: first calls allocate and load kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[repeats // 2] / 1e9


def memory_gib() -> tuple[float | None, float | None]:
    """(available, total) memory in GiB, None where the system does not say."""
    gib = 1024**3
    try:
        if sys.platform.startswith("linux"):
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemAvailable", "MemTotal")}
            return kib["MemAvailable"] * 1024 / gib, kib["MemTotal"] * 1024 / gib
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / gib
        if sys.platform == "darwin":  # free + inactive + speculative pages can be handed out now
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
            page = int(out.split("page size of")[1].split()[0])
            pages = {k.strip(): int(v.strip().rstrip(".")) for k, v in
                     (line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)}
            free = sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages speculative"))
            return free * page / gib, total
        return None, total
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError):
        return None, None


def memory_finding() -> Finding:
    available, total = memory_gib()
    if available is None:
        return Finding("memory", f"{total:.1f} GiB total" if total else "unknown")
    if available < 2:
        return Finding("memory", f"{available:.1f} GiB free of {total:.1f} GiB", "warning",
                       "fine-tuning even a 135M model needs about 2 GiB; close other programs")
    return Finding("memory", f"{available:.1f} GiB free of {total:.1f} GiB")


def model_findings() -> list[Finding]:
    """The model cache folder, and for each registry model whether it is installed and pulled."""
    from .models.gguf import IMPORT_DTYPES
    from .models.registry import REGISTRY, is_pulled, models_dir, source_files

    folder = models_dir()
    cached = sorted(p.name for p in folder.iterdir() if (p / "config.json").exists()) if folder.is_dir() else []
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    listing = f"{len(cached)} model{'s' if len(cached) != 1 else ''}" + (f": {', '.join(cached)}" if cached else "")
    findings = [Finding("model cache", f"{folder} ({listing})")]
    if not os.access(existing, os.W_OK):
        findings[0].level, findings[0].hint = "warning", f"{existing} is not writable; set TOSS_MLX_CACHE"
    for name, entry in REGISTRY.items():
        default = name == DEFAULT_MODEL
        if source_files(name) is None:
            # Only the default model is needed; the others are optional downloads.
            findings.append(Finding(name, "not installed" if default else "not installed (optional)",
                                    "warning" if default else "ok",
                                    entry.install_command + ("  (the default model)" if default else "")))
            continue
        pulled = [d for d in IMPORT_DTYPES if is_pulled(name, d)]
        state = f"pulled: {', '.join(pulled)}" if pulled else f"not pulled yet (toss-mlx model pull {name})"
        findings.append(Finding(name, f"installed, {state}"))
    return findings
