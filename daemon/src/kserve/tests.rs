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
