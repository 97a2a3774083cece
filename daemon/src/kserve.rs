//! The KServe v2 / Open Inference Protocol over HTTP: request parsing,
//! validation against the model's declared inputs, and response encoding,
//! JSON tensors and the binary tensor data extension both.
//!
//! Everything here is checked before tract sees it, and before anything
//! is allocated in proportion to what the request *claims*: a declared
//! shape is multiplied out with overflow checks and held to the configured
//! maximum first; only then are the elements read.

use serde_json::{Map, Value, json};
use tract_onnx::prelude::{Tensor, f16};

use crate::onnx::{DType, Dim, TensorSpec};

/// The request header carrying the JSON part's length (binary extension).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// One input as sent, before it is checked.
struct Input<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a Value,
    data: Option<&'a Value>,
    binary_size: Option<u64>,
}

/// An output the request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub binary: bool,
}

/// A request checked against a model: tensors in the model's input order.
#[derive(Debug)]
pub struct Checked {
    pub id: Option<String>,
    pub tensors: Vec<Tensor>,
    /// Outputs to return, in order (all, by default).
    pub outputs: Vec<Wanted>,
    /// The request's `parameters.user` (the end user, for policy).
    pub user: Option<String>,
}

/// How many leading bytes of a body of `len` bytes are its JSON header (all
/// of them without `Inference-Header-Content-Length`). Known before parsing,
/// so the parsed document can be charged for first.
pub fn json_len(len: usize, header_length: Option<&str>) -> Result<usize, String> {
    let Some(v) = header_length else {
        return Ok(len);
    };
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| format!("{HEADER_LENGTH} must be a byte count, found {v:?}"))?;
    if n > len {
        return Err(format!(
            "{HEADER_LENGTH} is {n} but the body is {len} bytes"
        ));
    }
    Ok(n)
}

/// The parts of a request body: the JSON header and the binary tail.
pub fn split_body<'a>(
    body: &'a [u8],
    header_length: Option<&str>,
) -> Result<(Value, &'a [u8]), String> {
    let (json, tail) = body.split_at(json_len(body.len(), header_length)?);
    let value: Value =
        serde_json::from_slice(json).map_err(|e| format!("the request is not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err("the request must be a JSON object".to_owned());
    }
    Ok((value, tail))
}

/// The request's `parameters.user`, read before the model is known (policy
/// needs it even when the model is not loaded).
pub fn user_of(request: &Value) -> Result<Option<String>, String> {
    match request.get("parameters").and_then(|p| p.get("user")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(u)) => Ok(Some(u.clone())),
        Some(_) => Err("parameters.user must be a string".to_owned()),
    }
}

fn as_object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what} must be a JSON object"))
}

/// Checks a request against the model's inputs and outputs; builds the tensors.
pub fn check(
    request: &Value,
    tail: &[u8],
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    max_elements: u64,
) -> Result<Checked, String> {
    let root = as_object(request, "the request")?;
    for key in root.keys() {
        if !matches!(key.as_str(), "id" | "inputs" | "outputs" | "parameters") {
            return Err(format!("unknown field {key:?} in the request"));
        }
    }
    let id = match root.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("id must be a string".to_owned()),
    };
    let params = root
        .get("parameters")
        .map(|p| as_object(p, "parameters"))
        .transpose()?;
    let binary_default = params
        .and_then(|p| p.get("binary_data_output"))
        .map(|v| {
            v.as_bool()
                .ok_or("parameters.binary_data_output must be a boolean")
        })
        .transpose()?
        .unwrap_or(false);
    let sent = root
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or("\"inputs\" (an array) is required")?;
    let mut parsed = Vec::with_capacity(sent.len());
    for (i, item) in sent.iter().enumerate() {
        let o = as_object(item, &format!("inputs[{i}]"))?;
        let field = |k: &str| o.get(k);
        let name = field("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("inputs[{i}].name (a string) is required"))?;
        let datatype = field("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("input {name:?}: datatype (a string) is required"))?;
        let shape = field("shape").ok_or_else(|| format!("input {name:?}: shape is required"))?;
        let binary_size = field("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| format!("input {name:?}: binary_data_size must be a byte count"))
            })
            .transpose()?;
        parsed.push(Input {
            name,
            datatype,
            shape,
            data: field("data"),
            binary_size,
        });
    }
    // Every declared input, once; nothing else.
    for input in &parsed {
        if !inputs.iter().any(|s| s.name == input.name) {
            let names: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "input {:?} is not an input of this model (its inputs: {})",
                input.name,
                names.join(", ")
            ));
        }
        if parsed.iter().filter(|p| p.name == input.name).count() > 1 {
            return Err(format!("input {:?} is given twice", input.name));
        }
    }
    let mut symbols: Vec<(String, u64, String)> = Vec::new();
    let mut tensors = Vec::with_capacity(inputs.len());
    let mut offset = 0usize;
    // Binary parts follow in the order the inputs were sent.
    let mut blobs: Vec<(&str, &[u8])> = Vec::new();
    for input in &parsed {
        if let Some(size) = input.binary_size {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            let end = offset
                .checked_add(size)
                .filter(|e| *e <= tail.len())
                .ok_or_else(|| {
                    format!(
                        "input {:?}: binary_data_size {size} runs past the end of the body",
                        input.name
                    )
                })?;
            blobs.push((input.name, &tail[offset..end]));
            offset = end;
        }
    }
    if offset != tail.len() {
        return Err(format!(
            "{} bytes of binary data follow the JSON that no input claims",
            tail.len() - offset
        ));
    }
    for spec in inputs {
        let input = parsed
            .iter()
            .find(|p| p.name == spec.name)
            .ok_or_else(|| format!("input {:?} is missing", spec.name))?;
        let name = &spec.name;
        let datatype = DType::parse(input.datatype).ok_or_else(|| {
            format!(
                "input {name:?}: {:?} is not a datatype this server takes (BOOL, UINT8-64, INT8-64, FP16, FP32, FP64)",
                input.datatype
            )
        })?;
        if datatype != spec.datatype {
            return Err(format!(
                "input {name:?}: datatype {}, the model expects {}",
                datatype.name(),
                spec.datatype.name()
            ));
        }
        let shape = input
            .shape
            .as_array()
            .ok_or_else(|| format!("input {name:?}: shape must be an array of sizes"))?;
        let shape: Vec<u64> = shape
            .iter()
            .map(|d| {
                d.as_u64().ok_or_else(|| {
                    format!(
                        "input {name:?}: shape {} holds something that is not a size",
                        input.shape
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let count =
            check_shape(spec, &shape, &mut symbols, max_elements).map_err(|e| e.to_string())?;
        // Every dimension is at most `count` now, so it fits.
        let dims: Vec<usize> = shape
            .iter()
            .map(|d| usize::try_from(*d).unwrap_or(usize::MAX))
            .collect();
        let tensor = match (blobs.iter().find(|(n, _)| *n == name.as_str()), input.data) {
            (Some((_, bytes)), _) => from_bytes(name, datatype, &dims, count, bytes)?,
            (None, Some(data)) => from_json(name, datatype, &dims, count, data)?,
            (None, None) => {
                return Err(format!(
                    "input {name:?}: neither data nor parameters.binary_data_size"
                ));
            }
        };
        tensors.push(tensor);
    }
    let outputs = wanted_outputs(root.get("outputs"), outputs, binary_default)?;
    Ok(Checked {
        id,
        tensors,
        outputs,
        user: user_of(request)?,
    })
}

/// A declared shape that does not fit the model's input, or this server.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("input {input:?}: shape {shape:?} has rank {}, the model expects {expected:?}", .shape.len())]
    Rank {
        input: String,
        shape: Vec<u64>,
        expected: Vec<i64>,
    },
    #[error(
        "input {input:?}: dimension {axis} is {got}, the model expects {want} (shape {expected:?})"
    )]
    Fixed {
        input: String,
        axis: usize,
        got: u64,
        want: usize,
        expected: Vec<i64>,
    },
    #[error(
        "input {input:?}: dimension {axis} ({symbol}) is {got}, but input {other:?} gives {symbol} = {value}"
    )]
    Symbol {
        input: String,
        axis: usize,
        symbol: String,
        got: u64,
        other: String,
        value: u64,
    },
    /// `count` is the product of the non-zero dimensions; `None` when it
    /// overflows 64 bits.
    #[error(
        "input {input:?}: shape {shape:?} holds {}; the limit is {limit} (onnx.max_tensor_elements)",
        elements(.count, .shape)
    )]
    TooManyElements {
        input: String,
        shape: Vec<u64>,
        count: Option<u64>,
        limit: u64,
    },
    #[error(
        "input {input:?}: shape {shape:?} holds no elements; a tensor with a 0 dimension is not run"
    )]
    Empty { input: String, shape: Vec<u64> },
}

fn elements(count: &Option<u64>, shape: &[u64]) -> String {
    let aside = if shape.contains(&0) {
        " (its 0 dimensions aside)"
    } else {
        ""
    };
    match count {
        Some(n) => format!("{n} elements{aside}"),
        None => format!("too many elements{aside}"),
    }
}

/// `shape` as sent for `spec`: its rank, each fixed dimension, each
/// symbol the same as where it appeared before (`symbols`: the symbol, its
/// value, the input that gave it), the product of its non-zero dimensions
/// (so each dimension too) at most `max_elements`, multiplied with
/// overflow checks, and not empty: a 0 dimension is refused (400) rather
/// than handed to tract, whose operators are not all defined on empty
/// tensors, and whatever the other dimensions claim it never counts as
/// small. Returns the element count.
fn check_shape(
    spec: &TensorSpec,
    shape: &[u64],
    symbols: &mut Vec<(String, u64, String)>,
    max_elements: u64,
) -> Result<usize, ShapeError> {
    let input = &spec.name;
    if shape.len() != spec.shape.len() {
        return Err(ShapeError::Rank {
            input: input.clone(),
            shape: shape.to_vec(),
            expected: spec.wire_shape(),
        });
    }
    for (axis, (got, want)) in shape.iter().zip(&spec.shape).enumerate() {
        match want {
            Dim::Fixed(n) if *got != *n as u64 => {
                return Err(ShapeError::Fixed {
                    input: input.clone(),
                    axis,
                    got: *got,
                    want: *n,
                    expected: spec.wire_shape(),
                });
            }
            Dim::Fixed(_) => {}
            Dim::Symbol(sym) => match symbols.iter().find(|(s, _, _)| s == sym) {
                Some((_, value, other)) if value != got => {
                    return Err(ShapeError::Symbol {
                        input: input.clone(),
                        axis,
                        symbol: sym.clone(),
                        got: *got,
                        other: other.clone(),
                        value: *value,
                    });
                }
                Some(_) => {}
                None => symbols.push((sym.clone(), *got, input.clone())),
            },
        }
    }
    let count = shape
        .iter()
        .filter(|d| **d != 0)
        .try_fold(1u64, |n, d| n.checked_mul(*d));
    let too_many = || ShapeError::TooManyElements {
        input: input.clone(),
        shape: shape.to_vec(),
        count,
        limit: max_elements,
    };
    let count = match count {
        Some(n) if n <= max_elements => usize::try_from(n).map_err(|_| too_many())?,
        _ => return Err(too_many()),
    };
    if shape.contains(&0) {
        return Err(ShapeError::Empty {
            input: input.clone(),
            shape: shape.to_vec(),
        });
    }
    Ok(count)
}

fn wanted_outputs(
    asked: Option<&Value>,
    outputs: &[TensorSpec],
    binary_default: bool,
) -> Result<Vec<Wanted>, String> {
    let Some(asked) = asked.filter(|v| !v.is_null()) else {
        return Ok(outputs
            .iter()
            .map(|o| Wanted {
                name: o.name.clone(),
                binary: binary_default,
            })
            .collect());
    };
    let asked = asked.as_array().ok_or("\"outputs\" must be an array")?;
    let mut wanted = Vec::with_capacity(asked.len());
    for (i, o) in asked.iter().enumerate() {
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("outputs[{i}].name (a string) is required"))?;
        if !outputs.iter().any(|s| s.name == name) {
            let names: Vec<&str> = outputs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "output {name:?} is not an output of this model (its outputs: {})",
                names.join(", ")
            ));
        }
        let binary = match o.get("parameters").and_then(|p| p.get("binary_data")) {
            None | Some(Value::Null) => binary_default,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("output {name:?}: binary_data must be a boolean"))?,
        };
        wanted.push(Wanted {
            name: name.to_owned(),
            binary,
        });
    }
    Ok(wanted)
}

/// Row-major elements of `data`, flat or nested, without recursion.
fn flatten<'a>(name: &str, data: &'a Value, count: usize) -> Result<Vec<&'a Value>, String> {
    // Grown as elements are found: a shape's claim alone reserves little.
    let mut out = Vec::with_capacity(count.min(1 << 16));
    let mut stack = vec![data];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().rev()),
            other => {
                if out.len() == count {
                    return Err(format!(
                        "input {name:?}: data holds more than the {count} elements its shape declares"
                    ));
                }
                out.push(other);
            }
        }
    }
    if out.len() != count {
        return Err(format!(
            "input {name:?}: data holds {} elements, its shape declares {count}",
            out.len()
        ));
    }
    Ok(out)
}

fn shaped<T: tract_onnx::prelude::Datum + Copy>(
    name: &str,
    dims: &[usize],
    values: Vec<T>,
) -> Result<Tensor, String> {
    Tensor::from_shape(dims, &values).map_err(|e| format!("input {name:?}: {e}"))
}

fn from_json(
    name: &str,
    dt: DType,
    dims: &[usize],
    count: usize,
    data: &Value,
) -> Result<Tensor, String> {
    let items = flatten(name, data, count)?;
    let bad = |i: usize, v: &Value| {
        format!(
            "input {name:?}: data[{i}] = {} is not a {} value",
            truncate(&v.to_string()),
            dt.name()
        )
    };
    macro_rules! ints {
        ($t:ty, $get:ident) => {{
            let mut out = Vec::with_capacity(count);
            for (i, v) in items.iter().enumerate() {
                out.push(
                    v.$get()
                        .and_then(|n| <$t>::try_from(n).ok())
                        .ok_or_else(|| bad(i, v))?,
                );
            }
            shaped(name, dims, out)
        }};
    }
    macro_rules! floats {
        ($conv:expr) => {{
            let mut out = Vec::with_capacity(count);
            for (i, v) in items.iter().enumerate() {
                out.push(v.as_f64().map($conv).ok_or_else(|| bad(i, v))?);
            }
            shaped(name, dims, out)
        }};
    }
    match dt {
        DType::Bool => {
            let mut out = Vec::with_capacity(count);
            for (i, v) in items.iter().enumerate() {
                out.push(v.as_bool().ok_or_else(|| bad(i, v))?);
            }
            shaped(name, dims, out)
        }
        DType::U8 => ints!(u8, as_u64),
        DType::U16 => ints!(u16, as_u64),
        DType::U32 => ints!(u32, as_u64),
        DType::U64 => ints!(u64, as_u64),
        DType::I8 => ints!(i8, as_i64),
        DType::I16 => ints!(i16, as_i64),
        DType::I32 => ints!(i32, as_i64),
        DType::I64 => ints!(i64, as_i64),
        #[allow(
            clippy::cast_possible_truncation,
            reason = "FP16 and FP32 values are sent as JSON numbers"
        )]
        DType::F16 => floats!(|f: f64| f16::from_f32(f as f32)),
        #[allow(
            clippy::cast_possible_truncation,
            reason = "FP32 values are sent as JSON numbers"
        )]
        DType::F32 => floats!(|f: f64| f as f32),
        DType::F64 => floats!(|f: f64| f),
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 40 {
        return s.to_owned();
    }
    let mut end = 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn from_bytes(
    name: &str,
    dt: DType,
    dims: &[usize],
    count: usize,
    bytes: &[u8],
) -> Result<Tensor, String> {
    let want = count.saturating_mul(dt.size());
    if bytes.len() != want {
        return Err(format!(
            "input {name:?}: {} bytes of binary data; {count} {} elements are {want}",
            bytes.len(),
            dt.name()
        ));
    }
    macro_rules! le {
        ($t:ty, $n:expr) => {{
            let out: Vec<$t> = bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])))
                .collect();
            shaped(name, dims, out)
        }};
    }
    match dt {
        DType::Bool => {
            let mut out = Vec::with_capacity(count);
            for (i, b) in bytes.iter().enumerate() {
                out.push(match b {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(format!(
                            "input {name:?}: byte {i} is {other}; a BOOL is 0 or 1"
                        ));
                    }
                });
            }
            shaped(name, dims, out)
        }
        DType::U8 => shaped(name, dims, bytes.to_vec()),
        DType::I8 => le!(i8, 1),
        DType::U16 => le!(u16, 2),
        DType::I16 => le!(i16, 2),
        DType::F16 => {
            let out: Vec<f16> = bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            shaped(name, dims, out)
        }
        DType::U32 => le!(u32, 4),
        DType::I32 => le!(i32, 4),
        DType::F32 => le!(f32, 4),
        DType::U64 => le!(u64, 8),
        DType::I64 => le!(i64, 8),
        DType::F64 => le!(f64, 8),
    }
}

/// One output as JSON data, or as bytes appended to `tail`.
fn encode_one(name: &str, t: &Tensor, binary: bool, tail: &mut Vec<u8>) -> Result<Value, String> {
    let dt = DType::from_tract(t.datum_type()).ok_or_else(|| {
        format!(
            "output {name:?} has datatype {:?}, which this server cannot send",
            t.datum_type()
        )
    })?;
    let shape: Vec<usize> = t.shape().to_vec();
    let mut out = json!({"name": name, "datatype": dt.name(), "shape": shape});
    macro_rules! slice {
        ($t:ty) => {
            t.to_plain_array_view::<$t>()
                .map_err(|e| format!("output {name:?}: {e}"))?
        };
    }
    if binary {
        let before = tail.len();
        macro_rules! put {
            ($t:ty) => {
                for v in slice!($t) {
                    tail.extend_from_slice(&v.to_le_bytes());
                }
            };
        }
        match dt {
            DType::Bool => tail.extend(slice!(bool).iter().map(|b| u8::from(*b))),
            DType::U8 => tail.extend(slice!(u8).iter()),
            DType::U16 => put!(u16),
            DType::U32 => put!(u32),
            DType::U64 => put!(u64),
            DType::I8 => put!(i8),
            DType::I16 => put!(i16),
            DType::I32 => put!(i32),
            DType::I64 => put!(i64),
            DType::F16 => put!(f16),
            DType::F32 => put!(f32),
            DType::F64 => put!(f64),
        }
        out["parameters"] = json!({"binary_data_size": tail.len() - before});
        return Ok(out);
    }
    let data: Vec<Value> = match dt {
        DType::Bool => slice!(bool).iter().map(|v| json!(v)).collect(),
        DType::U8 => slice!(u8).iter().map(|v| json!(v)).collect(),
        DType::U16 => slice!(u16).iter().map(|v| json!(v)).collect(),
        DType::U32 => slice!(u32).iter().map(|v| json!(v)).collect(),
        DType::U64 => slice!(u64).iter().map(|v| json!(v)).collect(),
        DType::I8 => slice!(i8).iter().map(|v| json!(v)).collect(),
        DType::I16 => slice!(i16).iter().map(|v| json!(v)).collect(),
        DType::I32 => slice!(i32).iter().map(|v| json!(v)).collect(),
        DType::I64 => slice!(i64).iter().map(|v| json!(v)).collect(),
        DType::F16 => slice!(f16).iter().map(|v| json!(v.to_f32())).collect(),
        DType::F32 => slice!(f32).iter().map(|v| json!(v)).collect(),
        DType::F64 => slice!(f64).iter().map(|v| json!(v)).collect(),
    };
    out["data"] = Value::Array(data);
    Ok(out)
}

/// The response document and its binary tail (empty when all JSON).
pub fn encode(
    model: &str,
    id: Option<&str>,
    specs: &[TensorSpec],
    tensors: &[Tensor],
    wanted: &[Wanted],
) -> Result<(Value, Vec<u8>), String> {
    let mut tail = Vec::new();
    let mut outputs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let index = specs
            .iter()
            .position(|s| s.name == w.name)
            .ok_or_else(|| format!("output {:?} is not an output of this model", w.name))?;
        let t = tensors
            .get(index)
            .ok_or_else(|| format!("the model returned no {:?}", w.name))?;
        outputs.push(encode_one(&w.name, t, w.binary, &mut tail)?);
    }
    let mut doc = json!({"model_name": model, "model_version": "1", "outputs": outputs});
    if let Some(id) = id {
        doc["id"] = json!(id);
    }
    Ok((doc, tail))
}

/// `GET /v2/models/{name}`: the model's inputs and outputs.
pub fn metadata(model: &str, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Value {
    json!({
        "name": model,
        "versions": ["1"],
        "platform": "onnx_tract",
        "inputs": inputs,
        "outputs": outputs,
    })
}

#[cfg(test)]
mod tests;
