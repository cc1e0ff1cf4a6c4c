"""Weight-only quantisation one tensor at a time: MatMulNBits bit for bit as onnxruntime's own quantiser writes
it, chunked reads equal to whole-tensor quantisation, external data in and out, and a peak memory that does not
grow with the part."""
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import part_io
from calibration.blockwise import BlockQuant, quantize, quantize_chunked
from calibration.weight_only import NBits, WeightOnlyPlan, quantize_weight_only


def matmul_graph(weight: np.ndarray, gemm_bias: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x @ W (MatMul, W [K,N]) or, with a bias, Gemm(x, W^T stored [N,K], transB=1) + b."""
    k, n = weight.shape
    if gemm_bias is None:
        node, inits = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), [numpy_helper.from_array(weight, "W")]
    else:
        node = helper.make_node("Gemm", ["x", "Wt", "b"], ["y"], name="mm", transB=1)
        inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "Wt"), numpy_helper.from_array(gemm_bias, "b")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_reference(model: onnx.ModelProto, bits: int, block: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), bits=bits,
                                     block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    return quantizer.model.model


def run(model_or_path, x):
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def uint8_and_float(model):
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return next(a for a in arrays if a.dtype == np.uint8), next(a for a in arrays if a.dtype == np.float32)


HEAD_ONLY = dict(dense=None, expert_bits=None, embedding_bits=None)   # the MatMul is the graph's output: "head"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 96])          # 96: K padded to one block of 128
def test_matmul_nbits_matches_onnxruntime_quantiser_bit_for_bit(tmp_path, bits, k):
    weight = np.random.default_rng(k + bits).normal(size=(k, 40)).astype(np.float32)
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(matmul_graph(weight), str(src))
    quantize_weight_only(src, dst, WeightOnlyPlan(head=NBits(bits, 128), **HEAD_ONLY))
    ours, theirs = onnx.load(str(dst)), ort_reference(matmul_graph(weight), bits, 128)
    (codes, scales), (want_codes, want_scales) = uint8_and_float(ours), uint8_and_float(theirs)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales.reshape(want_scales.shape), want_scales)
    attrs = {a.name: helper.get_attribute_value(a) for a in ours.graph.node[0].attribute}
    assert attrs == {"K": k, "N": 40, "bits": bits, "block_size": 128, "accuracy_level": 4}
    x = np.random.default_rng(1).normal(size=(3, k)).astype(np.float32)
    np.testing.assert_array_equal(run(dst, x), run(theirs, x))


def test_gemm_with_transposed_weight_and_bias_quantises_like_the_matmul(tmp_path):
    weight = np.random.default_rng(2).normal(size=(128, 48)).astype(np.float32)
    bias = np.random.default_rng(3).normal(size=48).astype(np.float32)
    src, dst = tmp_path / "g.onnx", tmp_path / "q.onnx"
    onnx.save(matmul_graph(weight, gemm_bias=bias), str(src))
    quantize_weight_only(src, dst, WeightOnlyPlan(head=NBits(4, 32), **HEAD_ONLY))
    q = onnx.load(str(dst))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits", "Add"]
    codes, _ = uint8_and_float(q)
    np.testing.assert_array_equal(codes.reshape(48, -1), quantize(weight.T, BlockQuant(4, 32))[0])
    x = np.random.default_rng(4).normal(size=(3, 128)).astype(np.float32)
    want = x @ weight + bias
    assert np.abs(run(dst, x) - want).max() < 0.1 * np.abs(want).max()   # 4-bit rounding, 16 levels per block


@pytest.mark.parametrize("k_first", [False, True])
def test_chunked_quantisation_equals_whole_tensor(k_first):
    weight = np.random.default_rng(5).normal(size=(320, 72)).astype(np.float32)
    spec = BlockQuant(4, 32) if k_first else BlockQuant(8, 16)
    want = quantize(weight.T if k_first else weight, spec)
    # 4 KB chunks: many reads, none a whole-tensor one
    got = quantize_chunked(lambda a, b: weight[a:b], weight.shape, weight.dtype, spec, k_first, chunk_bytes=4096)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("head", [NBits(8, 128), None])     # None: the external weight is copied across
def test_external_data_in_and_out_gives_the_same_graph(tmp_path, monkeypatch, head):
    weight = np.random.default_rng(6).normal(size=(2048, 1024)).astype(np.float32)     # 8 MB: external
    src = tmp_path / "src" / "f.onnx"
    src.parent.mkdir()
    onnx.save(matmul_graph(weight), str(src), save_as_external_data=True, location="f.onnx.data",
              size_threshold=1024)
    plan = WeightOnlyPlan(head=head, **HEAD_ONLY)
    one_file, split = tmp_path / "one" / "q.onnx", tmp_path / "split" / "q.onnx"
    one_file.parent.mkdir(), split.parent.mkdir()
    quantize_weight_only(src, one_file, plan)
    monkeypatch.setattr(part_io, "EXTERNAL_DATA_BYTES", 1024)     # force the output's weights out of the graph
    quantize_weight_only(src, split, plan)
    assert not one_file.with_name("q.onnx.data").exists() and split.with_name("q.onnx.data").exists()
    assert split.stat().st_size < 256 << 10     # the codes (or the float weight) are in q.onnx.data
    x = np.random.default_rng(7).normal(size=(3, 2048)).astype(np.float32)
    np.testing.assert_array_equal(run(split, x), run(one_file, x))
    if head is None:
        np.testing.assert_array_equal(run(split, x), run(src, x))


def test_peak_memory_does_not_grow_with_the_weights(tmp_path):
    """A 256 MB fp32 weight in external data is quantised in a fraction of its size (a whole-graph quantiser
    holds it at least once, plus its transpose): the bound is what streaming is for."""
    k = n = 8192
    src = tmp_path / "big.onnx"
    graph = matmul_graph(np.zeros((2, 2), np.float32))
    weight = graph.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.dims[:] = [k, n]
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(k * n * 4))):
        weight.external_data.add(key=key, value=value)
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value = k
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = n
    onnx.save(graph, str(src))
    np.random.default_rng(8).normal(size=(k, n)).astype(np.float32).tofile(tmp_path / "big.onnx.data")
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from calibration import blockwise
        from calibration.weight_only import NBits, WeightOnlyPlan, quantize_weight_only
        blockwise.CHUNK_BYTES = 8 << 20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        plan = WeightOnlyPlan(head=NBits(4, 128), dense=None, expert_bits=None, embedding_bits=None)
        quantize_weight_only(Path({str(src)!r}), Path({str(tmp_path / 'q.onnx')!r}), plan)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ":".join(sys.path)}).stdout.split()[-1])
    weight_bytes = k * n * 4
    # 8 MB chunk reads and their temporaries, plus the 4-bit output (1/8 of the weight): well under one copy
    assert grown < 0.4 * weight_bytes, f"peak grew by {grown / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"


@pytest.mark.parametrize("linear", [False, True])
def test_fp16_weights_behind_a_cast_quantise_like_their_fp32_values(tmp_path, linear):
    """What a model storing 16-bit weights and computing in fp32 traces to (moe_llava/upcast.py): MatMul(x,
    Cast(W16)), or for a Linear MatMul(x, Transpose(Cast(W16 [N, K]))). The quantiser reads through them; a
    cast weight nothing quantises (a bias) is written as its fp32 values."""
    weight = np.random.default_rng(9).normal(size=(256, 64)).astype(np.float16)          # [K, N]
    bias = np.random.default_rng(10).normal(size=64).astype(np.float16)
    cast = lambda src, dst: helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT)  # noqa: E731
    nodes = [cast("W16", "W"), cast("b16", "b")]
    stored = weight
    if linear:   # the weight stored as a Linear keeps it, [N, K]
        stored = np.ascontiguousarray(weight.T)
        nodes = [cast("W16", "Wt"), helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]), cast("b16", "b")]
    graph = helper.make_graph(
        nodes + [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        [numpy_helper.from_array(stored, "W16"), numpy_helper.from_array(bias, "b16")])
    src, dst = tmp_path / "f16.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    plan = WeightOnlyPlan(dense=NBits(4, 32), head=None, expert_bits=None, embedding_bits=None)
    quantize_weight_only(src, dst, plan)
    q = onnx.load(str(dst))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits", "Add"]
    codes, scales = uint8_and_float(q)
    want_codes, want_scales = quantize(weight.astype(np.float32).T, BlockQuant(4, 32))
    np.testing.assert_array_equal(codes.reshape(want_codes.shape), want_codes)
    np.testing.assert_array_equal(scales, want_scales)              # scales in the compute dtype, fp32
    stored_bias = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name == "b")
    assert stored_bias.dtype == np.float32 and np.array_equal(stored_bias, bias.astype(np.float32))
