"""Small ONNX models for the KServe tests, written with the `onnx` package.

identity-<type>.onnx: input "x" of shape [batch, 3], output "y" = x, one per
datatype airgate serves. shapes.onnx: inputs "a" FP32 [n, 4] and "b" INT64
[n, 2] sharing the symbolic dimension n; outputs "a_out" = a and "b_sum" =
b + b. Usage: make_test_onnx.py DIR
"""
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}


def save(model, path):
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for name, t in TYPES.items():
        x = helper.make_tensor_value_info("x", t, ["batch", 3])
        y = helper.make_tensor_value_info("y", t, ["batch", 3])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], f"identity_{name}", [x], [y])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="airgate-tests"),
             out / f"identity-{name.lower()}.onnx")
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 2])
    a_out = helper.make_tensor_value_info("a_out", TensorProto.FLOAT, ["n", 4])
    b_sum = helper.make_tensor_value_info("b_sum", TensorProto.INT64, ["n", 2])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["a_out"]), helper.make_node("Add", ["b", "b"], ["b_sum"])],
        "shapes", [a, b], [a_out, b_sum])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="airgate-tests"),
         out / "shapes.onnx")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
