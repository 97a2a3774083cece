"""Small ONNX models for the KServe tests, written with the `onnx` package.

identity-<type>.onnx: input "x" of shape [batch, 3], output "y" = x, one per
datatype airgate serves. shapes.onnx: inputs "a" FP32 [n, 4] and "b" INT64
[n, 2] sharing the symbolic dimension n; outputs "a_out" = a and "b_sum" =
b + b. With a tokenizer.json, also guard.onnx: a bag-of-words logistic
classifier over its token ids (input_ids, attention_mask [batch, seq]) whose
output "probabilities" [batch, 2] is (safe, unsafe): each of a few words
adds 3 to the logit, the bias is -2, so one such word scores 0.73 and none
0.12. Usage: make_test_onnx.py DIR [TOKENIZER_JSON]
"""
import json
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


UNSAFE_WORDS = ["bomb", "weapon", "poison", "kill", "explosives"]


def guard(out: Path, tokenizer: Path):
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    weights = [0.0] * len(vocab)
    for word in UNSAFE_WORDS:
        if word in vocab:
            weights[vocab[word]] = 3.0
    W = helper.make_tensor("W", TensorProto.FLOAT, [len(vocab)], weights)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [], [-2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axis1 = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], ["per_token"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["per_token", "maskf"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("Add", ["summed", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Unsqueeze", ["p", "axis1"], ["p_col"]),
        helper.make_node("Sub", ["one", "p_col"], ["q_col"]),
        helper.make_node("Concat", ["q_col", "p_col"], ["probabilities"], axis=1),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph(nodes, "guard", [ids, mask], [probs], initializer=[W, bias, one, axis1])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="airgate-tests"),
         out / "guard.onnx")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        guard(Path(sys.argv[1]), Path(sys.argv[2]))
