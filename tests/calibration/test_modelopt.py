"""ModelOpt Q/DQ (the TensorRT path) on CPU: routers excluded, graph runs in onnxruntime."""
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration.graph import qdq_fed_inputs
from calibration.readers import stacked
from calib_helpers import ROUTER, feeds, moe_layer_graph

# find_spec, not an import: importing ModelOpt's quantiser would patch onnxruntime.quantization in this process
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt not installed (pip install .[quant])")


@needs_modelopt
def test_modelopt_int8_keeps_the_router_float(tmp_path):
    from calibration.modelopt_qdq import modelopt_qdq
    src = tmp_path / "f.onnx"
    onnx.save(moe_layer_graph(batched=True), str(src))
    out = modelopt_qdq(src, tmp_path / "q.onnx", "int8", stacked(feeds(batched=True)), plugins=[],
                       high_precision_dtype="fp32")
    q = onnx.load(str(out))
    by_name = {n.name: n for n in q.graph.node}
    assert qdq_fed_inputs(q, by_name[ROUTER]) == []
    assert qdq_fed_inputs(q, by_name["/ffn/fc1"])                          # the dense MatMul got Q/DQ
    x = feeds(1, seed=5, batched=True)[0]
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(got[1], want[1])
    assert np.abs(got[0] - want[0]).max() <= 0.05 * np.abs(want[0]).max()
    # ModelOpt ran in a child process: this process's onnxruntime calibrators are the stock ones
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    assert MinMaxCalibrater.compute_data.__module__ == "onnxruntime.quantization.calibrate"


def test_missing_modelopt_is_a_user_error(monkeypatch):
    import importlib.util

    from calibration import modelopt_qdq as mq
    from runtime.errors import UserError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'moe-llava-edge\[quant\]'"):
        mq.modelopt_qdq("x.onnx", "y.onnx", "int8", {})
