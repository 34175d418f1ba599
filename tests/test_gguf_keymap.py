from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxweights as jw
from jaxweights._keymap import GGUF_TO_HF, UnpermuteHeads
from jaxweights.errors import ArgumentError, CheckpointError, StructureMismatchError

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN, VOCAB = 64, 8, 2, 8, 2, 96, 32


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def hf_state() -> dict[str, np.ndarray]:
    """A Hugging Face llama-like state dict (PyTorch layout), grouped-query attention with a bias on q/k/v."""
    rng = np.random.default_rng(0)

    def tensor(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    state = {
        "model.embed_tokens.weight": tensor(VOCAB, HIDDEN),
        "model.norm.weight": tensor(HIDDEN),
        "lm_head.weight": tensor(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        state |= {
            f"{layer}.self_attn.q_proj.weight": tensor(HEADS * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.q_proj.bias": tensor(HEADS * HEAD_DIM),
            f"{layer}.self_attn.k_proj.weight": tensor(KV_HEADS * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.k_proj.bias": tensor(KV_HEADS * HEAD_DIM),
            f"{layer}.self_attn.v_proj.weight": tensor(KV_HEADS * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.v_proj.bias": tensor(KV_HEADS * HEAD_DIM),
            f"{layer}.self_attn.o_proj.weight": tensor(HIDDEN, HEADS * HEAD_DIM),
            f"{layer}.mlp.gate_proj.weight": tensor(FFN, HIDDEN),
            f"{layer}.mlp.up_proj.weight": tensor(FFN, HIDDEN),
            f"{layer}.mlp.down_proj.weight": tensor(HIDDEN, FFN),
            f"{layer}.input_layernorm.weight": tensor(HIDDEN),
            f"{layer}.post_attention_layernorm.weight": tensor(HIDDEN),
        }
    return state


def to_gguf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What llama.cpp's converter writes: GGUF names, q/k rows permuted (k with the kv head count)."""
    out = {}
    for name, value in state.items():
        if ".q_proj." in name:
            value = llama_cpp_permute(value, HEADS)
        elif ".k_proj." in name:
            value = llama_cpp_permute(value, KV_HEADS)
        out[GGUF_TO_HF.checkpoint_name(name)] = np.ascontiguousarray(value)
    return out


def nested(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """The flat state as a nested pytree of zeros (the target)."""
    tree: dict[str, Any] = {}
    for name, value in state.items():
        *path, last = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = jnp.zeros(value.shape, value.dtype)
    return tree


def assert_bit_for_bit(restored: dict[str, Any], state: dict[str, np.ndarray]) -> None:
    for name, value in state.items():
        leaf: Any = restored
        for part in name.split("."):
            leaf = leaf[part]
        np.testing.assert_array_equal(np.asarray(leaf), value, err_msg=name)


def test_gguf_names_are_llama_cpp_names(hf_state: dict[str, np.ndarray]) -> None:
    from gguf.constants import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

    known = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[MODEL_ARCH.LLAMA] for i in range(LAYERS)}
    for name in hf_state:
        base, suffix = GGUF_TO_HF.checkpoint_name(name).rsplit(".", 1)
        assert base in known and suffix in ("weight", "bias"), name
    assert GGUF_TO_HF.checkpoint_name("model.layers.1.self_attn.o_proj.weight") == (
        TENSOR_NAMES[MODEL_TENSOR.ATTN_OUT].format(bid=1) + ".weight"
    )


def test_unpermute_undoes_llama_cpp_for_queries_and_grouped_keys() -> None:
    w = np.random.default_rng(1).standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), dtype=np.float32)
    for heads in (1, KV_HEADS, KV_HEADS * HEAD_DIM // 2):
        np.testing.assert_array_equal(UnpermuteHeads("k", heads=heads)(llama_cpp_permute(w, heads)), w)
    with pytest.raises(jw.errors.ShapeMismatchError, match="do not split into 3 heads"):
        UnpermuteHeads("q", heads=3)(w)
    with pytest.raises(ArgumentError, match="no head count yet"):
        UnpermuteHeads("q")(w)
    assert UnpermuteHeads("q", heads=np.int64(4)).heads == 4  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="positive int, not '4'"):
        UnpermuteHeads("q", heads="4")  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="'q' or 'k'"):
        UnpermuteHeads("v")  # type: ignore[arg-type]


def test_head_counts_from_metadata() -> None:
    llama = {"general.architecture": "llama", "llama.attention.head_count": np.uint32(32)}
    assert UnpermuteHeads("q").for_checkpoint(llama).heads == 32
    assert UnpermuteHeads("k").for_checkpoint(llama).heads == 32  # no head_count_kv: no GQA
    assert UnpermuteHeads("k").for_checkpoint({**llama, "llama.attention.head_count_kv": 8}).heads == 8
    assert UnpermuteHeads("q").for_checkpoint({"qwen2.attention.head_count": "14"}).heads == 14
    assert UnpermuteHeads("q", heads=4).for_checkpoint({}).heads == 4
    with pytest.raises(CheckpointError, match=r"'llama.attention.head_count' is missing.*heads=N"):
        UnpermuteHeads("q").for_checkpoint({"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match="is 'many', not a positive integer"):
        UnpermuteHeads("q").for_checkpoint({"general.architecture": "x", "x.attention.head_count": "many"})
    for hostile in ("\u00b2", "9" * 5000, "-3", "0"):  # a superscript digit, past int()'s limit
        with pytest.raises(CheckpointError, match="not a positive integer"):
            UnpermuteHeads("q").for_checkpoint(
                {"general.architecture": "x", "x.attention.head_count": hostile}
            )


def test_gguf_names_from_safetensors_round_trip(tmp_path: Path, hf_state: dict[str, np.ndarray]) -> None:
    metadata = {
        "general.architecture": "llama",
        "llama.attention.head_count": str(HEADS),
        "llama.attention.head_count_kv": str(KV_HEADS),
    }
    path = jw.save_file(to_gguf(hf_state), tmp_path / "llama.safetensors", metadata=metadata)
    restored = jw.restore(path, nested(hf_state), keymap=GGUF_TO_HF)
    assert_bit_for_bit(restored, hf_state)


def test_missing_head_count_is_reported_before_reading(
    tmp_path: Path, hf_state: dict[str, np.ndarray]
) -> None:
    path = jw.save_file(to_gguf(hf_state), tmp_path / "llama.safetensors")
    with pytest.raises(StructureMismatchError) as caught:
        jw.restore(path, nested(hf_state), keymap=GGUF_TO_HF)
    message = str(caught.value)
    assert "mismatched (8)" in message  # q and k, weight and bias, in 2 layers
    assert "model.layers.0.self_attn.k_proj.bias: UnpermuteHeads('k')" in message
    assert "'{general.architecture}.attention.head_count_kv' is missing" in message
    explicit = jw.KeyMap(
        GGUF_TO_HF.renames,
        (
            (r"\.q_proj\.", UnpermuteHeads("q", heads=HEADS)),
            (r"\.k_proj\.", UnpermuteHeads("k", heads=KV_HEADS)),
        ),
    )
    assert_bit_for_bit(jw.restore(path, nested(hf_state), keymap=explicit), hf_state)


def test_gguf_file_round_trip(tmp_path: Path, hf_state: dict[str, np.ndarray]) -> None:
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for name, value in to_gguf(hf_state).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    restored = jw.restore(path, nested(hf_state), keymap=GGUF_TO_HF)
    assert_bit_for_bit(restored, hf_state)


def stacked(state: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The target of a scanned model (``model.layers.*`` leaves with a leading layer axis) and its values."""
    flat = {name: value for name, value in state.items() if not name.startswith("model.layers.")}
    for name in (n for n in state if n.startswith("model.layers.0.")):
        rest = name.removeprefix("model.layers.0.")
        flat[f"model.layers.{rest}"] = np.stack([state[f"model.layers.{i}.{rest}"] for i in range(LAYERS)])
    return nested(flat), flat


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_gguf_restores_into_a_scanned_model(
    tmp_path: Path, hf_state: dict[str, np.ndarray], quantized: bool
) -> None:
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, value in to_gguf(hf_state).items():
        if quantized and name.endswith(("attn_q.weight", "attn_k.weight")):  # rows of 64 values: Q8_0 blocks
            writer.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target, expected = stacked(hf_state)
    restored, report = jw.restore(path, target, keymap=GGUF_TO_HF, stack="model.layers", report=True)
    assert "stacked from" in report.converted["model.layers.self_attn.k_proj.weight"]
    if not quantized:
        assert_bit_for_bit(restored, expected)
        return
    for name in ("q_proj", "k_proj"):  # dequantized llama.cpp-permuted rows, unpermuted per layer
        heads = HEADS if name == "q_proj" else KV_HEADS
        per_layer = []
        for i in range(LAYERS):
            hf = hf_state[f"model.layers.{i}.self_attn.{name}.weight"]
            blocks = gguf.quants.quantize(llama_cpp_permute(hf, heads), q8)
            per_layer.append(np.asarray(UnpermuteHeads("q", heads=heads)(gguf.quants.dequantize(blocks, q8))))
        leaf = np.asarray(restored["model"]["layers"]["self_attn"][name]["weight"])
        np.testing.assert_allclose(leaf, np.stack(per_layer), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(restored["model"]["layers"]["mlp"]["up_proj"]["weight"]),
        expected["model.layers.mlp.up_proj.weight"],
    )


def test_quantized_tensors_match_float_targets_by_logical_shape(tmp_path: Path) -> None:
    from jaxweights._pytree import flatten_target
    from jaxweights._restore import _match
    from jaxweights.formats import Checkpoint, TensorInfo, WeightsFormat

    q8 = jw.QuantizationEncoding.Q8_0
    file = tmp_path / "model.gguf"
    size = q8.bytes_for_shape((16, 64))
    infos = {
        name: TensorInfo(name, jw.DType.uint8, (16, 64), file, 0, size, q8)
        for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight")
    }
    checkpoint = Checkpoint(WeightsFormat.gguf, infos, [file], metadata={"llama.attention.head_count": 2})
    target = {
        "model.layers.0.self_attn.q_proj.weight": jax.ShapeDtypeStruct((16, 64), jnp.bfloat16),
        "model.layers.0.mlp.up_proj.weight": jax.ShapeDtypeStruct((16, 64), jnp.float32),
    }
    leaves, _ = flatten_target(target)
    keymap = jw.KeyMap(tuple((rf"^{hf}$", gguf) for hf, gguf in zip(target, infos, strict=True)))
    keymap = jw.KeyMap(keymap.renames, GGUF_TO_HF.transforms)
    match = _match(checkpoint, "", leaves, keymap, strict=True, cast=False, device=jw.DeviceRef.CPU())
    assert not match.mismatched and not match.missing and not match.unexpected
    assert {t.info.name: t.dtype for t in match.tensors} == {
        "blk.0.attn_q.weight": jw.DType.bfloat16,
        "blk.0.ffn_up.weight": jw.DType.float32,
    }
    transforms = {t.info.name: t.transform for t in match.tensors}
    assert transforms == {"blk.0.attn_q.weight": UnpermuteHeads("q", heads=2), "blk.0.ffn_up.weight": None}

    wrong = {"w": jax.ShapeDtypeStruct((16, 64), jnp.int8), "v": jax.ShapeDtypeStruct((16, 32), jnp.float32)}
    leaves, _ = flatten_target(wrong)
    renames = jw.KeyMap((("^w$", "blk.0.attn_q.weight"), ("^v$", "blk.0.ffn_up.weight")))
    match = _match(checkpoint, "", leaves, renames, strict=True, cast=True, device=jw.DeviceRef.CPU())
    assert sorted(match.mismatched) == [
        "v: target shape (16, 32), checkpoint 'blk.0.ffn_up.weight' has (16, 64)",
        "w: target dtype int8, checkpoint 'blk.0.attn_q.weight' is Q8_0-quantized and dequantizes to "
        "floats only (use a float target)",
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_gguf_restores_dequantized_and_unpermuted(tmp_path: Path, dtype: Any) -> None:
    import gguf

    hf = np.random.default_rng(2).standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), dtype=np.float32)
    blocks = gguf.quants.quantize(llama_cpp_permute(hf, KV_HEADS), gguf.GGMLQuantizationType.Q8_0)
    path = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_tensor("blk.0.attn_k.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    expected = UnpermuteHeads("k", heads=KV_HEADS)(values).astype(dtype)
    target = {"model.layers.0.self_attn.k_proj.weight": jnp.zeros(hf.shape, dtype)}
    restored = jw.restore(path, nested({k: np.asarray(v) for k, v in target.items()}), keymap=GGUF_TO_HF)
    leaf = restored["model"]["layers"]["0"]["self_attn"]["k_proj"]["weight"]
    assert leaf.dtype == dtype
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
