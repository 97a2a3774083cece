//! KServe v2 inference request bodies as the daemon reads them: split at
//! `Inference-Header-Content-Length` into JSON and binary tail
//! (`kserve::split_body`), the end user read for policy (`kserve::user_of`),
//! then checked against a model's signature (`kserve::check`), with a
//! small element limit.
//!
//! Input: one line, then the body. The line's first byte picks the model
//! signature: `a`..`l` one input `x` of shape [batch, 4] in each datatype
//! (BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16,
//! FP32, FP64, in that order), any other a text model (`input_ids`,
//! `attention_mask` INT64 [batch, sequence], `scale` FP32 [1]); the rest of
//! the line, if any, is the header's value.
//!
//! An accepted request must hold, read back from the body here: one tensor
//! per model input, in the model's order, of its datatype; each tensor's
//! shape is the shape sent, of the model's rank, fixed dimensions as
//! declared and each symbol one value across inputs; its element count is
//! the product of its shape, not 0 and within the limit; its elements are
//! as many as the JSON data holds, or its bytes exactly the binary part it
//! claimed, every byte of the tail claimed once; the outputs are the
//! model's; the user and id are the ones sent. And the tensors survive
//! being encoded as a response (binary and JSON) and checked again.
#![no_main]

use airgate::kserve::{Checked, Wanted, check, encode, json_len, split_body, user_of};
use airgate::onnx::{DType, Dim, TensorSpec};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Small, so claims of large tensors are refused rather than allocated.
const MAX_ELEMENTS: u64 = 4096;

fn spec(name: &str, datatype: DType, shape: &[Option<usize>], symbols: &[&str]) -> TensorSpec {
    let mut next = symbols.iter();
    TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: shape
            .iter()
            .map(|d| match d {
                Some(n) => Dim::Fixed(*n),
                None => Dim::Symbol((*next.next().expect("a symbol per variable dim")).to_owned()),
            })
            .collect(),
    }
}

/// (inputs, outputs) of the model the line's first byte names.
fn signature(b: u8) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    match b {
        b'a'..=b'l' => (
            vec![spec(
                "x",
                DType::ALL[usize::from(b - b'a')],
                &[None, Some(4)],
                &["batch"],
            )],
            vec![spec("y", DType::F32, &[None, Some(2)], &["batch"])],
        ),
        _ => {
            let text = |name| spec(name, DType::I64, &[None, None], &["batch", "sequence"]);
            (
                vec![
                    text("input_ids"),
                    text("attention_mask"),
                    spec("scale", DType::F32, &[Some(1)], &[]),
                ],
                vec![
                    spec(
                        "last_hidden_state",
                        DType::F32,
                        &[None, None, Some(8)],
                        &["batch", "sequence"],
                    ),
                    spec("pooled", DType::F16, &[None, Some(8)], &["batch"]),
                ],
            )
        }
    }
}

/// Leaves of a JSON data value, flat or nested (what `check` counts).
fn leaves(v: &Value) -> usize {
    match v {
        Value::Array(items) => items.iter().map(leaves).sum(),
        _ => 1,
    }
}

fn sent_input<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["inputs"]
        .as_array()
        .and_then(|inputs| inputs.iter().find(|i| i["name"] == name))
        .expect("every model input was sent")
}

fn accepted(doc: &Value, tail: &[u8], inputs: &[TensorSpec], outputs: &[TensorSpec], c: &Checked) {
    assert_eq!(c.tensors.len(), inputs.len());
    // The binary parts, in the order the inputs were sent.
    let mut parts: Vec<(&str, &[u8])> = Vec::new();
    let mut offset = 0;
    for input in doc["inputs"].as_array().expect("inputs") {
        if let Some(size) = input["parameters"]["binary_data_size"].as_u64() {
            let size = usize::try_from(size).expect("within the tail");
            let name = input["name"].as_str().expect("a name");
            parts.push((name, &tail[offset..offset + size]));
            offset += size;
        }
    }
    assert_eq!(offset, tail.len(), "every byte of the tail is claimed");

    let mut symbols: Vec<(&str, usize)> = Vec::new();
    for (t, spec) in c.tensors.iter().zip(inputs) {
        let shape = t.shape();
        assert_eq!(shape.len(), spec.shape.len(), "{}", spec.name);
        for (got, want) in shape.iter().zip(&spec.shape) {
            match want {
                Dim::Fixed(n) => assert_eq!(got, n, "{}", spec.name),
                Dim::Symbol(s) => match symbols.iter().find(|(name, _)| name == s) {
                    Some((_, value)) => assert_eq!(got, value, "{} ({s})", spec.name),
                    None => symbols.push((s.as_str(), *got)),
                },
            }
        }
        let count: usize = shape.iter().product();
        assert_eq!(t.len(), count);
        assert!(count > 0, "{}: an empty tensor", spec.name);
        assert!(
            count as u64 <= MAX_ELEMENTS,
            "{}: {count} elements",
            spec.name
        );
        assert_eq!(DType::from_tract(t.datum_type()), Some(spec.datatype));

        let sent = sent_input(doc, &spec.name);
        let sent_shape: Vec<u64> = sent["shape"]
            .as_array()
            .expect("an accepted shape is an array")
            .iter()
            .map(|d| d.as_u64().expect("a size"))
            .collect();
        assert_eq!(
            sent_shape,
            shape.iter().map(|d| *d as u64).collect::<Vec<_>>()
        );
        match parts.iter().find(|(name, _)| *name == spec.name) {
            Some((_, bytes)) => {
                assert_eq!(bytes.len(), count * spec.datatype.size());
                // Little-endian on the wire, as tract holds it on this host.
                if cfg!(target_endian = "little") {
                    assert_eq!(t.as_bytes(), *bytes, "{}: the bytes sent", spec.name);
                }
            }
            None => assert_eq!(leaves(&sent["data"]), count, "{}", spec.name),
        }
    }

    match doc.get("outputs").filter(|o| !o.is_null()) {
        None => {
            let names: Vec<&str> = c.outputs.iter().map(|w| w.name.as_str()).collect();
            let all: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
            assert_eq!(names, all);
        }
        Some(asked) => {
            assert_eq!(Some(c.outputs.len()), asked.as_array().map(Vec::len));
            for w in &c.outputs {
                assert!(outputs.iter().any(|o| o.name == w.name), "{}", w.name);
            }
        }
    }
    let user = user_of(doc).expect("an accepted request's user reads");
    assert_eq!(c.user, user);
    assert_eq!(c.user.as_deref(), doc["parameters"]["user"].as_str());
    assert_eq!(c.id.as_deref(), doc["id"].as_str());

    round_trip(inputs, outputs, c, true);
    round_trip(inputs, outputs, c, false);
}

/// The tensors encoded as a response (as if the model echoed its inputs),
/// then handed back as a request document: the same tensors, bit for bit.
/// A tensor holding a NaN or an infinity is left out of the JSON check
/// (JSON has neither: it encodes as null).
fn round_trip(inputs: &[TensorSpec], outputs: &[TensorSpec], c: &Checked, binary: bool) {
    let wanted: Vec<Wanted> = inputs
        .iter()
        .map(|s| Wanted {
            name: s.name.clone(),
            binary,
        })
        .collect();
    let (response, tail) = encode("m", None, inputs, &c.tensors, &wanted).expect("encodes");
    let request = json!({"inputs": response["outputs"]});
    if !binary && request["inputs"].to_string().contains("null") {
        return;
    }
    let again = check(&request, &tail, inputs, outputs, MAX_ELEMENTS)
        .unwrap_or_else(|e| panic!("a checked request encoded (binary: {binary}) fails: {e}"));
    for (a, b) in c.tensors.iter().zip(&again.tensors) {
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.datum_type(), b.datum_type());
        assert_eq!(a.as_bytes(), b.as_bytes(), "binary: {binary}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(newline) = data.iter().position(|b| *b == b'\n') else {
        return;
    };
    let (line, body) = (&data[..newline], &data[newline + 1..]);
    let Some((model, header)) = line.split_first() else {
        return;
    };
    let header = match header {
        [] => None,
        bytes => match std::str::from_utf8(bytes) {
            Ok(h) => Some(h),
            Err(_) => return,
        },
    };
    let (inputs, outputs) = signature(*model);
    let Ok((doc, tail)) = split_body(body, header) else {
        return;
    };
    assert!(doc.is_object());
    let json = json_len(body.len(), header).expect("a body that splits has a JSON length");
    assert_eq!(json + tail.len(), body.len());
    if header.is_none() {
        assert!(tail.is_empty());
    }
    // Policy reads the user before the model is known.
    let user = user_of(&doc);
    if let Ok(Some(u)) = &user {
        assert_eq!(doc["parameters"]["user"].as_str(), Some(u.as_str()));
    }
    match check(&doc, tail, &inputs, &outputs, MAX_ELEMENTS) {
        Ok(c) => accepted(&doc, tail, &inputs, &outputs, &c),
        Err(e) => assert!(!e.is_empty()),
    }
});
