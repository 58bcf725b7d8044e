"""`toss-mlx fuse`: the fused model equals base + adapter; a quantized base is requantized."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from adapters import make_adapter, mlx_logits, quantized_copy, read_config
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from toss_mlx.fuse import fuse_adapter
from toss_mlx.io import TossError

TARGETS = ("q_proj", "v_proj", "down_proj")


def load(path, adapter=None):
    from mlx_lm import load as mlx_load

    model, _ = mlx_load(str(path), adapter_path=None if adapter is None else str(adapter))
    return model


def naive_fused_weights(base_weights: dict, adapter_dir) -> dict:
    """W + scale * (A B)^T per adapted module, and DoRA's row rescaling m / ||row||, in numpy."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_parameters"]["scale"]
    adapter = load_file(str(adapter_dir / "adapters.safetensors"))
    out = {}
    for name in adapter:
        if not name.endswith(".lora_a"):
            continue
        path = name[: -len(".lora_a")]
        w = base_weights[path].astype(np.float64)
        w = w + scale * (adapter[f"{path}.lora_a"].astype(np.float64) @ adapter[f"{path}.lora_b"]).T
        if f"{path}.m" in adapter:
            w = w * (adapter[f"{path}.m"] / np.linalg.norm(w, axis=1))[:, None]
        out[path] = w
    return out


def dense_weights(model) -> dict:
    """Every linear layer's weight as float numpy, dequantized where quantized."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode)
        elif isinstance(m, nn.Linear):
            w = m.weight
        else:
            continue
        out[name] = np.array(w.astype(mx.float32))
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fuse_float_base(dora, tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", dora=dora, num_layers=1, targets=TARGETS)
    result = fuse_adapter(str(tiny_model_dir), adapter, tmp_path / "fused")
    assert result.fused_modules == len(TARGETS) and not result.quantized

    fused = load(tmp_path / "fused")
    assert not [k for k, _ in tree_flatten(fused.parameters()) if "lora" in k]
    base, reference = load(tiny_model_dir), load(tiny_model_dir, adapter)
    expected = mlx_logits(reference)
    assert np.abs(expected - mlx_logits(base)).max() > 0.5, "the adapter must visibly change the logits"
    np.testing.assert_allclose(mlx_logits(fused), expected, atol=1e-4)

    want = naive_fused_weights(dense_weights(base), adapter)
    got = dense_weights(fused)
    assert set(want) == {f"model.layers.1.{k}" for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for path, w in want.items():
        np.testing.assert_allclose(got[path], w, atol=1e-5)
    for path, w in dense_weights(base).items():  # untouched layers stay bit-identical
        if path not in want:
            np.testing.assert_array_equal(got[path], w)
    fused_config = read_config(tmp_path / "fused")
    assert {k: fused_config.get(k) for k in read_config(tiny_model_dir)} == read_config(tiny_model_dir)
    assert "toss-mlx fuse" in (tmp_path / "fused" / "README.md").read_text()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("group_size,bits,max_share", [(32, 4, 0.25), (64, 8, 0.02)], ids=["q4g32", "q8g64"])
def test_fuse_quantized_base(dora, group_size, bits, max_share, tiny_model_dir, tmp_path):
    qdir = quantized_copy(tiny_model_dir, tmp_path / "q", group_size, bits)
    adapter = make_adapter(qdir, tmp_path / "adapter", dora=dora, targets=TARGETS)
    base, reference = load(qdir), load(qdir, adapter)
    expected = mlx_logits(reference)
    effect = np.abs(expected - mlx_logits(base)).max()
    assert effect > 0.5

    # --dequantize: the exact float sum of the dequantized base and the adapter.
    fuse_adapter(str(qdir), adapter, tmp_path / "float", dequantize=True)
    as_float = load(tmp_path / "float")
    assert "quantization" not in read_config(tmp_path / "float")
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in as_float.named_modules())
    np.testing.assert_allclose(mlx_logits(as_float), expected, atol=1e-4)
    want = naive_fused_weights(dense_weights(base), adapter)
    float_weights = dense_weights(as_float)
    for path, w in want.items():
        np.testing.assert_allclose(float_weights[path], w, atol=1e-5)

    # Default: requantized with the base's own group size and bits, i.e. exactly the
    # quantization of that float sum.
    result = fuse_adapter(str(qdir), adapter, tmp_path / "fused")
    assert result.quantized and result.fused_modules == 2 * len(TARGETS)
    assert read_config(tmp_path / "fused")["quantization"]["bits"] == bits
    fused = load(tmp_path / "fused")
    modules = dict(fused.named_modules())
    for path in want:
        m = modules[path]
        assert isinstance(m, nn.QuantizedLinear) and (m.group_size, m.bits) == (group_size, bits)
        q, scales, biases = mx.quantize(mx.array(float_weights[path]), group_size, bits)
        np.testing.assert_array_equal(np.array(m.weight), np.array(q))
        np.testing.assert_allclose(np.array(m.scales), np.array(scales), rtol=1e-6)
        np.testing.assert_allclose(np.array(m.biases), np.array(biases), rtol=1e-6, atol=1e-7)
    # Rounding the sum to the grid again moves the logits by a fraction of the adapter's effect.
    drift = np.abs(mlx_logits(fused) - expected).max()
    print(f"requantized q{bits}g{group_size} {'dora' if dora else 'lora'}: max logit drift "
          f"{drift:.4f}, adapter effect {effect:.4f}")
    assert drift < max_share * effect, (drift, effect)


def test_fuse_keeps_base_dtype(tiny_model_dir, tmp_path):
    from mlx_lm.utils import save_config, save_model

    from toss_mlx.models.load import set_dtype

    bf16 = tmp_path / "bf16"
    model = load(tiny_model_dir)
    set_dtype(model, "bfloat16", quiet=True)
    save_model(bf16, model)
    save_config(read_config(tiny_model_dir), bf16 / "config.json")
    for f in tiny_model_dir.glob("tokenizer*"):
        (bf16 / f.name).write_bytes(f.read_bytes())
    adapter = make_adapter(bf16, tmp_path / "adapter", dora=True, targets=TARGETS)
    fuse_adapter(str(bf16), adapter, tmp_path / "fused")
    dtypes = {v.dtype for _, v in tree_flatten(load(tmp_path / "fused").parameters())}
    assert dtypes == {mx.bfloat16}


def test_fuse_bad_input(tiny_model_dir, tmp_path):
    from tiny import build_model_folder

    with pytest.raises(TossError, match="adapter folder not found"):
        fuse_adapter(str(tiny_model_dir), tmp_path / "nope", tmp_path / "out")
    deeper = build_model_folder(tmp_path / "three-layers", num_hidden_layers=3)
    adapter = make_adapter(deeper, tmp_path / "adapter")
    with pytest.raises(TossError, match="does not match the base model"):
        fuse_adapter(str(tiny_model_dir), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TossError, match="not a model folder"):
        fuse_adapter(str(tmp_path / "adapter"), adapter, tmp_path / "out")
    with pytest.raises(TossError, match="would replace the input"):
        fuse_adapter(str(deeper), adapter, deeper)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(TossError, match="holds other files"):
        fuse_adapter(str(deeper), adapter, foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    fuse_adapter(str(deeper), adapter, tmp_path / "out")
    fuse_adapter(str(deeper), adapter, tmp_path / "out")  # an earlier fuse output is replaced


def test_cli(tiny_model_dir, tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    runner = CliRunner()
    result = runner.invoke(app, ["fuse", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                                 "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert "fused 4 modules" in result.output
    result = runner.invoke(app, ["fuse", "--model", str(tmp_path / "missing"), "--adapter", str(adapter),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output
