//! Parsing, checking and encoding without a model: specs stand in for one.

use super::*;

fn spec(name: &str, datatype: DType, shape: Vec<Dim>) -> TensorSpec {
    TensorSpec {
        name: name.to_owned(),
        datatype,
        shape,
    }
}

fn batch_by(n: usize) -> Vec<Dim> {
    vec![Dim::Symbol("batch".to_owned()), Dim::Fixed(n)]
}

#[test]
fn every_datatype_survives_json_and_binary_both_ways() {
    for dt in DType::ALL {
        let inputs = [spec("x", dt, batch_by(2))];
        let data = match dt {
            DType::Bool => json!([true, false, false, true]),
            DType::F16 | DType::F32 | DType::F64 => json!([1.5, -2.0, 0.0, 8.0]),
            DType::I8 | DType::I16 | DType::I32 | DType::I64 => json!([-1, 2, -3, 4]),
            _ => json!([1, 2, 3, 4]),
        };
        let request = json!({"inputs": [{"name": "x", "datatype": dt.name(), "shape": [2, 2], "data": data}]});
        let checked = check(&request, &[], &inputs, &inputs, 100).expect("checks");
        assert_eq!(checked.tensors[0].shape(), &[2, 2]);
        let wanted = [Wanted {
            name: "x".to_owned(),
            binary: false,
        }];
        let (doc, tail) = encode("m", None, &inputs, &checked.tensors, &wanted).expect("json");
        assert!(tail.is_empty());
        assert_eq!(doc["outputs"][0]["data"], data, "{}", dt.name());
        // Binary out, then binary in again: the same tensor.
        let wanted = [Wanted {
            name: "x".to_owned(),
            binary: true,
        }];
        let (doc, tail) = encode("m", None, &inputs, &checked.tensors, &wanted).expect("binary");
        assert_eq!(tail.len(), 4 * dt.size());
        assert_eq!(
            doc["outputs"][0]["parameters"]["binary_data_size"],
            4 * dt.size()
        );
        let request = json!({"inputs": [{"name": "x", "datatype": dt.name(), "shape": [2, 2],
                                          "parameters": {"binary_data_size": tail.len()}}]});
        let again = check(&request, &tail, &inputs, &inputs, 100).expect("binary checks");
        assert_eq!(again.tensors[0], checked.tensors[0], "{}", dt.name());
    }
}

#[test]
fn a_binary_bool_must_be_0_or_1_and_every_byte_must_be_claimed() {
    let inputs = [spec("x", DType::Bool, batch_by(2))];
    let request = |size: usize| {
        json!({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1, 2],
                           "parameters": {"binary_data_size": size}}]})
    };
    let err = check(&request(2), &[1, 2], &inputs, &inputs, 100).expect_err("2 is no bool");
    assert!(err.contains("byte 1 is 2"), "{err}");
    let err = check(&request(2), &[1, 0, 0], &inputs, &inputs, 100).expect_err("extra byte");
    assert!(
        err.contains("1 bytes of binary data follow the JSON that no input claims"),
        "{err}"
    );
    let err = check(&request(3), &[1, 0], &inputs, &inputs, 100).expect_err("short");
    assert!(err.contains("runs past the end of the body"), "{err}");
}

#[test]
fn the_body_splits_at_the_declared_header_length() {
    let body = br#"{"inputs": []}XYZ"#;
    let (doc, tail) = split_body(body, Some("14")).expect("split");
    assert_eq!(doc, json!({"inputs": []}));
    assert_eq!(tail, b"XYZ");
    assert!(split_body(body, Some("x")).is_err());
    assert!(split_body(body, Some("99")).is_err());
    assert!(
        split_body(b"[1]", None)
            .expect_err("an array")
            .contains("JSON object")
    );
    assert_eq!(
        user_of(&json!({"parameters": {"user": "u"}})),
        Ok(Some("u".to_owned()))
    );
    assert!(user_of(&json!({"parameters": {"user": 3}})).is_err());
}

#[test]
fn outputs_default_to_all_and_binary_follows_the_request_default() {
    let outputs = [
        spec("y", DType::F32, batch_by(2)),
        spec("z", DType::I64, batch_by(2)),
    ];
    let all = wanted_outputs(None, &outputs, true).expect("all");
    assert_eq!(
        all.iter()
            .map(|w| (w.name.as_str(), w.binary))
            .collect::<Vec<_>>(),
        [("y", true), ("z", true)]
    );
    let one = wanted_outputs(
        Some(&json!([{"name": "z", "parameters": {"binary_data": false}}])),
        &outputs,
        true,
    )
    .expect("one");
    assert_eq!(
        one,
        [Wanted {
            name: "z".to_owned(),
            binary: false
        }]
    );
}

fn shapes_model() -> [TensorSpec; 2] {
    [
        spec("a", DType::F32, batch_by(4)),
        spec("b", DType::I64, batch_by(2)),
    ]
}

#[test]
fn a_shape_is_bounded_by_its_non_zero_dimensions_and_never_empty() {
    let model = shapes_model();
    let bound = |shape: &[u64], max: u64| check_shape(&model[0], shape, &mut Vec::new(), max);
    assert_eq!(bound(&[3, 4], 12), Ok(12));
    let too_many = |shape: &[u64], count: Option<u64>| ShapeError::TooManyElements {
        input: "a".to_owned(),
        shape: shape.to_vec(),
        count,
        limit: 100,
    };
    assert_eq!(bound(&[26, 4], 100), Err(too_many(&[26, 4], Some(104))));
    assert_eq!(
        bound(&[u64::MAX, 4], 100),
        Err(too_many(&[u64::MAX, 4], None)),
        "multiplied with overflow checks"
    );
    assert_eq!(
        bound(&[1 << 62, 4], 100),
        Err(too_many(&[1 << 62, 4], None))
    );
    // A fixed dimension is checked before the size.
    let err = bound(&[0, 1 << 40], 100).expect_err("a fixed dimension of 4");
    assert!(matches!(err, ShapeError::Fixed { axis: 1, .. }), "{err}");
    // A 0 dimension does not make the others small: they are bounded as
    // if it were not there, and then the empty tensor is refused anyway.
    let wide = spec(
        "w",
        DType::F32,
        vec![Dim::Symbol("n".to_owned()), Dim::Symbol("m".to_owned())],
    );
    let err = check_shape(&wide, &[0, 1 << 40], &mut Vec::new(), 100).expect_err("huge");
    assert_eq!(
        err.to_string(),
        "input \"w\": shape [0, 1099511627776] holds 1099511627776 elements (its 0 dimensions aside); the limit is 100 (onnx.max_tensor_elements)"
    );
    let err = check_shape(&wide, &[1 << 40, 0], &mut Vec::new(), 100).expect_err("huge");
    assert!(matches!(err, ShapeError::TooManyElements { .. }), "{err}");
    assert_eq!(
        check_shape(&wide, &[0, 7], &mut Vec::new(), 100),
        Err(ShapeError::Empty {
            input: "w".to_owned(),
            shape: vec![0, 7],
        })
    );
    assert_eq!(
        check_shape(&model[1], &[0, 2], &mut Vec::new(), 100),
        Err(ShapeError::Empty {
            input: "b".to_owned(),
            shape: vec![0, 2],
        })
    );
}

#[test]
fn a_symbol_takes_one_value_across_inputs() {
    let [a, b] = shapes_model();
    let mut symbols = Vec::new();
    assert_eq!(check_shape(&a, &[2, 4], &mut symbols, 100), Ok(8));
    assert_eq!(
        check_shape(&b, &[3, 2], &mut symbols, 100),
        Err(ShapeError::Symbol {
            input: "b".to_owned(),
            axis: 0,
            symbol: "batch".to_owned(),
            got: 3,
            other: "a".to_owned(),
            value: 2,
        })
    );
    assert_eq!(check_shape(&b, &[2, 2], &mut symbols, 100), Ok(4));
    let err = check_shape(&a, &[2], &mut Vec::new(), 100).expect_err("rank");
    assert_eq!(
        err.to_string(),
        "input \"a\": shape [2] has rank 1, the model expects [-1, 4]"
    );
}

#[test]
fn a_zero_dimension_or_a_count_mismatch_is_refused_before_tract() {
    let inputs = shapes_model();
    let request = |shape_a: Value, data_a: Value| {
        json!({"inputs": [
            {"name": "a", "datatype": "FP32", "shape": shape_a, "data": data_a},
            {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]})
    };
    let refused = |body: &Value, tail: &[u8], max: u64| {
        check(body, tail, &inputs, &inputs, max).expect_err("refused")
    };
    let err = refused(&request(json!([0, 4]), json!([])), &[], 100);
    assert!(err.contains("holds no elements"), "{err}");
    let err = refused(&request(json!([1, 4]), json!([1, 2, 3])), &[], 100);
    assert!(
        err.contains("data holds 3 elements, its shape declares 4"),
        "{err}"
    );
    let err = refused(&request(json!([1, 4]), json!([1, 2, 3, 4, 5])), &[], 100);
    assert!(err.contains("more than the 4 elements"), "{err}");
    // A huge claim with no data is refused for its size, before anything
    // is reserved for it.
    let err = refused(&request(json!([1u64 << 40, 4]), json!([])), &[], 1 << 20);
    assert!(
        err.contains("the limit is 1048576 (onnx.max_tensor_elements)"),
        "{err}"
    );
    // The binary extension: the byte count must be the shape's.
    let binary = json!({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 12}},
        {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]});
    let err = refused(&binary, &[0; 12], 100);
    assert!(
        err.contains("12 bytes of binary data; 4 FP32 elements are 16"),
        "{err}"
    );
}
