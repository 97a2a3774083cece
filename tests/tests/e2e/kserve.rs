//! ONNX models through tract over the KServe v2 protocol, end to end: the
//! real MiniLM model against tract called in this process, every datatype
//! round-tripped through generated models, malformed inputs refused with a
//! 400 naming the problem, and the `tritonclient[http]` Python package over
//! mutual TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};

use airgate_tests::{
    Daemon, Sandbox, get, models_dir, policy, python, raw_request, sha256_hex, wait_model,
};
use serde_json::{Value, json};
use tract_onnx::prelude::*;

const MINILM: &str = "paraphrase-minilm-l3";

/// The generated test models (tests/python/make_test_onnx.py) in `dir`,
/// the guard classifier included.
pub(crate) fn make_models(dir: &Path) {
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/make_test_onnx.py"
        ))
        .arg(dir)
        .arg(models_dir().join("minilm-tokenizer.json"))
        .output()
        .expect("make_test_onnx.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const TYPES: [&str; 12] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64",
];

/// A models directory with MiniLM (linked) and the generated models; the
/// manifest entries for the generated ones, with their digests.
fn models(sb: &Sandbox) -> (PathBuf, String, Vec<String>) {
    let dir = sb.path().join("models");
    make_models(&dir);
    std::os::unix::fs::symlink(
        models_dir().join("paraphrase-MiniLM-L3-v2.onnx"),
        dir.join("paraphrase-MiniLM-L3-v2.onnx"),
    )
    .expect("link minilm");
    std::os::unix::fs::symlink(
        models_dir().join("minilm-tokenizer.json"),
        dir.join("minilm-tokenizer.json"),
    )
    .expect("link the tokenizer");
    let mut ids = Vec::new();
    let mut manifest = String::new();
    let mut entry = |id: &str, file: &str| {
        let digest = sha256_hex(&std::fs::read(dir.join(file)).expect("model file"));
        manifest += &format!(
            "\n[[models]]\nid = \"{id}\"\nformat = \"onnx\"\nkinds = [\"tensor\"]\nlicence = \"Apache-2.0\"\nfiles = [{{ role = \"weights\", name = \"{file}\", sha256 = \"{digest}\" }}]\n"
        );
        ids.push(id.to_owned());
    };
    for t in TYPES {
        let t = t.to_lowercase();
        entry(&format!("identity-{t}"), &format!("identity-{t}.onnx"));
    }
    entry("shapes", "shapes.onnx");
    (dir, manifest, ids)
}

fn tenant(models: &[String], identities: &str) -> String {
    let list: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[[tenants]]\nid = \"ops\"\nidentities = {identities}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\", {}]\nuser_identity = {{ kind = \"openai_user\" }}\nlimits = {{ requests_per_minute = 100000 }}\n",
        list.join(", ")
    )
}

fn start(sb: &Sandbox, extra: &str) -> (Daemon, Vec<String>) {
    let (dir, manifest, ids) = models(sb);
    sb.publish(&sb.sign(
        "v1",
        &(policy(1, &tenant(&ids, "{ uids = [0] }")) + &manifest),
    ));
    let config = sb
        .config(
            "",
            &format!("[onnx]\nworkers = 2\nqueue = 4\nmax_tensor_elements = 100000\n{extra}"),
        )
        .replace(
            "state_dir = ",
            &format!("models_dir = \"{}\"\nstate_dir = ", dir.display()),
        );
    let d = Daemon::start(sb, &config, &[]);
    d.wait_bundle(1);
    wait_model(&d, MINILM);
    for id in &ids {
        wait_model(&d, id);
    }
    (d, ids)
}

fn post(d: &Daemon, path: &str, body: &[u8], headers: &[(&str, &str)]) -> airgate_tests::Response {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    raw_request(&d.socket, &request).expect("request")
}

fn infer(d: &Daemon, model: &str, body: &Value) -> airgate_tests::Response {
    post(
        d,
        &format!("/v2/models/{model}/infer"),
        body.to_string().as_bytes(),
        &[],
    )
}

/// The same inputs through tract in this process.
fn in_process(ids: &[i64], batch: usize, seq: usize) -> Vec<Tensor> {
    let model = airgate::onnx::OnnxModel::load(
        MINILM,
        &models_dir().join("paraphrase-MiniLM-L3-v2.onnx"),
        1,
        0,
        0,
        1 << 20,
    )
    .expect("tract loads MiniLM");
    let ids = tract_ndarray::Array2::from_shape_vec((batch, seq), ids.to_vec()).expect("shape");
    let mask = tract_ndarray::Array2::from_elem((batch, seq), 1i64);
    model
        .run_blocking(vec![ids.into_tensor(), mask.into_tensor()])
        .expect("run")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

#[test]
fn minilm_over_kserve_matches_tract_in_process_and_every_datatype_round_trips() {
    let sb = Sandbox::new();
    let (d, _) = start(&sb, "");

    let server = get(&d.socket, "/v2", &[]).json();
    assert_eq!(server["name"], "airgate");
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));
    assert_eq!(get(&d.socket, "/v2/health/live", &[]).status, 200);
    assert_eq!(get(&d.socket, "/v2/health/ready", &[]).status, 200);
    assert_eq!(
        get(&d.socket, &format!("/v2/models/{MINILM}/ready"), &[]).status,
        200
    );
    let meta = get(&d.socket, &format!("/v2/models/{MINILM}"), &[]).json();
    assert_eq!(meta["name"], MINILM);
    assert_eq!(
        meta["inputs"],
        json!([
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ]),
        "{meta}"
    );
    let embedding = meta["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["shape"] == json!([-1, 384]))
        .and_then(|o| o["name"].as_str())
        .expect("a [batch, 384] FP32 output")
        .to_owned();
    let same = get(&d.socket, &format!("/v2/models/{MINILM}/versions/1"), &[]).json();
    assert_eq!(same, meta);
    assert_eq!(get(&d.socket, "/v2/models/nope", &[]).status, 404);
    assert_eq!(
        get(&d.socket, &format!("/v2/models/{MINILM}/versions/2"), &[]).status,
        404
    );

    // Batch 2, sequence 6, nested data: equal to tract in-process.
    let ids: Vec<i64> = vec![
        101, 7592, 2088, 2003, 2204, 102, 101, 2054, 2003, 1996, 3437, 102,
    ];
    let body = json!({
        "id": "req-42",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [2, 6],
             "data": [&ids[..6], &ids[6..]]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [2, 6], "data": vec![1; 12]},
        ],
        "outputs": [{"name": embedding}],
        "parameters": {"user": "alice"},
    });
    let r = infer(&d, MINILM, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    assert_eq!(a["id"], "req-42");
    assert_eq!(a["model_name"], MINILM);
    assert_eq!(
        a["outputs"].as_array().map(Vec::len),
        Some(1),
        "only what was asked"
    );
    let out = &a["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), &out["datatype"]),
        (Some(embedding.as_str()), &json!("FP32"))
    );
    assert_eq!(out["shape"], json!([2, 384]));
    let served = floats(&out["data"]);
    let reference = in_process(&ids, 2, 6);
    let index = meta["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .position(|o| o["name"] == embedding.as_str())
        .expect("index");
    let expected: Vec<f32> = reference[index]
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect();
    assert_eq!(served.len(), expected.len());
    let worst = served
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest difference {worst}");

    // The same request with binary input and output (the extension).
    let mut blob = Vec::new();
    for v in &ids {
        blob.extend_from_slice(&v.to_le_bytes());
    }
    let header = json!({
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [2, 6],
             "parameters": {"binary_data_size": blob.len()}},
            {"name": "attention_mask", "datatype": "INT64", "shape": [2, 6], "data": vec![1; 12]},
        ],
        "outputs": [{"name": embedding, "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut bytes = header.clone().into_bytes();
    bytes.extend_from_slice(&blob);
    let len = header.len().to_string();
    let r = post(
        &d,
        &format!("/v2/models/{MINILM}/infer"),
        &bytes,
        &[("Inference-Header-Content-Length", &len)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let json_len: usize = r
        .header("inference-header-content-length")
        .expect("header length")
        .parse()
        .expect("number");
    let doc: Value = serde_json::from_slice(&r.body[..json_len]).expect("json part");
    assert_eq!(
        doc["outputs"][0]["parameters"]["binary_data_size"],
        2 * 384 * 4
    );
    let binary: Vec<f32> = r.body[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    assert_eq!(binary, served, "binary and JSON agree");

    // Every datatype through its identity model, JSON both ways.
    let samples: [(&str, Value); 12] = [
        ("BOOL", json!([true, false, true])),
        ("UINT8", json!([0, 7, 255])),
        ("UINT16", json!([0, 7, 65535])),
        ("UINT32", json!([0, 7, 4_294_967_295u64])),
        ("UINT64", json!([0, 7, u64::MAX])),
        ("INT8", json!([-128, 0, 127])),
        ("INT16", json!([-32768, 0, 32767])),
        ("INT32", json!([-2_147_483_648i64, 0, 2_147_483_647])),
        ("INT64", json!([i64::MIN, 0, i64::MAX])),
        ("FP16", json!([-1.5, 0.0, 65504.0])),
        ("FP32", json!([-1.5, 0.25, 1.2676506002282294e30])),
        ("FP64", json!([-1.5, 0.1, 1.0e300])),
    ];
    for (t, data) in samples {
        let model = format!("identity-{}", t.to_lowercase());
        let body = json!({"inputs": [{"name": "x", "datatype": t, "shape": [1, 3], "data": data}]});
        let r = infer(&d, &model, &body);
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        let out = &r.json()["outputs"][0];
        assert_eq!(
            (out["name"].clone(), out["datatype"].clone()),
            (json!("y"), json!(t))
        );
        assert_eq!(out["shape"], json!([1, 3]));
        assert_eq!(out["data"], data, "{t} round-trips");
    }

    // Shared symbolic dimensions, a fixed dimension, output selection.
    let body = json!({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        {"name": "b", "datatype": "INT64", "shape": [2, 2], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "b_sum"}]});
    let r = infer(&d, "shapes", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["outputs"],
        json!([{"name": "b_sum", "datatype": "INT64", "shape": [2, 2], "data": [2, 4, 6, 8]}])
    );

    // Beyond 2 workers and a queue of 4, a request is refused at once (503).
    let heavy = json!({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [8, 128], "data": vec![2000; 1024]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [8, 128], "data": vec![1; 1024]}],
        "outputs": [{"name": embedding}]})
    .to_string();
    let barrier = Arc::new(Barrier::new(12));
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let (socket, heavy, barrier) = (d.socket.clone(), heavy.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let head = format!(
                    "POST /v2/models/{MINILM}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    heavy.len()
                );
                let r = raw_request(&socket, &[head.as_bytes(), heavy.as_bytes()].concat()).expect("request");
                (r.status, r.text())
            })
        })
        .collect();
    let results: Vec<(u16, String)> = burst
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let refused = results.iter().filter(|(s, _)| *s == 503).count();
    assert!(refused >= 1, "some refused: {results:?}");
    assert!(
        results.iter().filter(|(s, _)| *s == 200).count() >= 6,
        "the pool's worth served"
    );
    for (status, text) in &results {
        assert!(
            *status == 200 || (*status == 503 && text.contains("overloaded")),
            "{status} {text}"
        );
    }

    // Decided and audited like every inference: one decision, one
    // completion (completions are queued to the writer without waiting, so
    // the last ones may take a moment to reach the log).
    let count = || {
        let out = Command::new(airgate_tests::airgate_bin())
            .args(["audit", "export", "--config"])
            .arg(sb.config_path())
            .output()
            .expect("export");
        let records = String::from_utf8_lossy(&out.stdout).into_owned();
        let decisions = records
            .lines()
            .filter(|l| l.contains("\"decision\"") && l.contains("/v2/models/{name}/infer"))
            .count();
        let completions = records
            .lines()
            .filter(|l| l.contains("\"completion\"") && l.contains("\"served\":true"))
            .count();
        (decisions, completions)
    };
    let want = (2 + 12 + 1 + 12, 2 + 12 + 1 + 12 - refused);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count() != want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        count(),
        want,
        "(decisions, served completions): a refused run is not served"
    );
}

#[test]
fn malformed_inputs_get_a_400_naming_the_problem() {
    let sb = Sandbox::new();
    let (d, _) = start(&sb, "");
    let input = |name: &str, t: &str, shape: Value, data: Value| json!({"name": name, "datatype": t, "shape": shape, "data": data});
    let ok_b = input("b", "INT64", json!([1, 2]), json!([1, 2]));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "wrong name",
            json!({"inputs": [input("c", "FP32", json!([1, 4]), json!([1, 2, 3, 4])), ok_b]}),
            "input \"c\" is not an input of this model (its inputs: a, b)",
        ),
        (
            "missing input",
            json!({"inputs": [ok_b]}),
            "input \"a\" is missing",
        ),
        ("twice", json!({"inputs": [ok_b, ok_b]}), "given twice"),
        (
            "wrong datatype",
            json!({"inputs": [input("a", "FP64", json!([1, 4]), json!([1, 2, 3, 4])), ok_b]}),
            "input \"a\": datatype FP64, the model expects FP32",
        ),
        (
            "unknown datatype",
            json!({"inputs": [input("a", "FLOAT", json!([1, 4]), json!([1, 2, 3, 4])), ok_b]}),
            "\"FLOAT\" is not a datatype",
        ),
        (
            "rank",
            json!({"inputs": [input("a", "FP32", json!([4]), json!([1, 2, 3, 4])), ok_b]}),
            "has rank 1, the model expects [-1, 4]",
        ),
        (
            "fixed dimension",
            json!({"inputs": [input("a", "FP32", json!([1, 5]), json!([1, 2, 3, 4, 5])), ok_b]}),
            "dimension 1 is 5, the model expects 4",
        ),
        (
            "symbol mismatch",
            json!({"inputs": [input("a", "FP32", json!([2, 4]), json!([0, 0, 0, 0, 0, 0, 0, 0])), ok_b]}),
            "but input \"a\" gives n = 2",
        ),
        (
            "too few elements",
            json!({"inputs": [input("a", "FP32", json!([1, 4]), json!([1, 2, 3])), ok_b]}),
            "data holds 3 elements, its shape declares 4",
        ),
        (
            "too many elements",
            json!({"inputs": [input("a", "FP32", json!([1, 4]), json!([1, 2, 3, 4, 5])), ok_b]}),
            "more than the 4 elements",
        ),
        (
            "not numeric",
            json!({"inputs": [input("a", "FP32", json!([1, 4]), json!([1, "two", 3, 4])), ok_b]}),
            "data[1] = \"two\" is not a FP32 value",
        ),
        (
            "out of range",
            json!({"inputs": [input("a", "FP32", json!([1, 4]), json!([1, 2, 3, 4])), input("b", "INT64", json!([1, 2]), json!([1, 1e30]))]}),
            "data[1] = 1e+30 is not a INT64 value",
        ),
        (
            "huge dimensions",
            json!({"inputs": [input("a", "FP32", json!([1_000_000_000_000u64, 4]), json!([])), ok_b]}),
            "the limit is 100000 (onnx.max_tensor_elements)",
        ),
        (
            "overflowing dimensions",
            json!({"inputs": [input("a", "FP32", json!([u64::MAX, 4]), json!([])), ok_b]}),
            "holds too many elements",
        ),
        (
            "zero dimension",
            json!({"inputs": [input("a", "FP32", json!([0, 4]), json!([])), ok_b]}),
            "holds no elements",
        ),
        (
            "negative dimension",
            json!({"inputs": [input("a", "FP32", json!([-1, 4]), json!([])), ok_b]}),
            "not a size",
        ),
        (
            "unknown output",
            json!({"inputs": [input("a", "FP32", json!([1, 4]), json!([1, 2, 3, 4])), ok_b], "outputs": [{"name": "zzz"}]}),
            "output \"zzz\" is not an output of this model",
        ),
        (
            "no inputs",
            json!({"outputs": []}),
            "\"inputs\" (an array) is required",
        ),
        (
            "unknown field",
            json!({"inputs": [], "extra": 1}),
            "unknown field \"extra\"",
        ),
    ];
    // Each of these reaches policy (it says nothing of the model before
    // policy allows the caller), then is held to the model.
    let decided = cases.len() + 1;
    for (what, body, want) in cases {
        let r = infer(&d, "shapes", &body);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let message = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(want), "{what}: {message}");
    }
    // Not JSON; binary sizes that do not add up.
    let r = post(&d, "/v2/models/shapes/infer", b"{nope", &[]);
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON")
    );
    let header = json!({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 12}},
        {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]})
    .to_string();
    let mut bytes = header.clone().into_bytes();
    bytes.extend_from_slice(&[0; 12]);
    let r = post(
        &d,
        "/v2/models/shapes/infer",
        &bytes,
        &[("Inference-Header-Content-Length", &header.len().to_string())],
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("12 bytes of binary data; 4 FP32 elements are 16"),
        "{}",
        r.text()
    );
    let r = post(
        &d,
        "/v2/models/shapes/infer",
        &bytes,
        &[("Inference-Header-Content-Length", "999999")],
    );
    assert_eq!(r.status, 400);
    // What was not a request (not JSON, sizes that do not add up) did not
    // reach policy; the rest was decided (allowed) and then refused by the
    // model's checks: a decision each, and a completion that served nothing
    // (completions are queued to the writer without waiting: polled for).
    let records = || -> Vec<Value> {
        let out = Command::new(airgate_tests::airgate_bin())
            .args(["audit", "export", "--config"])
            .arg(sb.config_path())
            .output()
            .expect("export");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let events = |records: &[Value], kind: &str| {
        records
            .iter()
            .filter(|r| r["event"]["kind"] == kind)
            .map(|r| r["event"].clone())
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = records();
    while events(&seen, "completion").len() < decided && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = records();
    }
    let decisions = events(&seen, "decision");
    assert_eq!(decisions.len(), decided, "{decisions:?}");
    assert!(decisions.iter().all(|d| d["decision"] == "allow"));
    let completions = events(&seen, "completion");
    assert_eq!(completions.len(), decided, "{completions:?}");
    assert!(
        completions
            .iter()
            .all(|c| c["outcome"] == "error" && c["served"] == false),
        "{completions:?}"
    );
    // The daemon is fine.
    let body = json!({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]});
    assert_eq!(infer(&d, "shapes", &body).status, 200);
}

#[test]
fn the_tritonclient_python_package_works_over_mtls() {
    let python = python();
    let sb = Sandbox::new();
    let site = crate::tls::Site::new(&sb);
    let tenant = format!(
        "[[tenants]]\nid = \"claims\"\nidentities = {{ uris = [\"{}\"] }}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\"]\nuser_identity = {{ kind = \"openai_user\" }}\n",
        crate::tls::CLAIMS
    );
    sb.publish(&sb.sign("v2", &policy(2, &tenant)));
    let config = site.config(&sb).replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", models_dir().display()),
    );
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(2);
    wait_model(&d, MINILM);
    let addr = crate::tls::tls_addr(&d);
    let dir = sb.path().join("pki");
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/triton_client.py"
        ))
        .arg(format!("localhost:{}", addr.port()))
        .arg(dir.join("ca/ca.pem"))
        .arg(dir.join("claims.pem"))
        .arg(dir.join("claims.key"))
        .arg(MINILM)
        .output()
        .expect("run the triton client");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let seen: Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("the client's JSON line");
    assert_eq!(seen["live"], true, "{seen}");
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["inputs"], json!(["input_ids", "attention_mask"]));
    assert_eq!(seen["shape"], json!([1, 384]));
    assert_eq!(seen["id"], "triton-7");
    let binary = floats(&seen["embedding"]);
    let json_out = floats(&seen["json_embedding"]);
    assert_eq!(binary, json_out, "binary and JSON outputs agree");
    let ids = [101i64, 7592, 2088, 102];
    let reference = in_process(&ids, 1, 4);
    let name = seen["output"].as_str().expect("output name");
    let _ = name;
    let expected: Vec<f32> = reference
        .iter()
        .find(|t| t.shape() == [1, 384])
        .expect("[1, 384] output")
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect();
    let worst = binary
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest difference {worst}");
    assert!(
        seen["error"]
            .as_str()
            .unwrap_or("")
            .contains("datatype INT32, the model expects INT64"),
        "{seen}"
    );
}

#[test]
fn model_import_copies_only_what_the_manifest_names_and_the_daemon_loads_it() {
    let sb = Sandbox::new();
    let source = sb.path().join("usb");
    make_models(&source);
    std::fs::write(source.join("stray.bin"), b"not a model").expect("stray file");
    let digest = sha256_hex(&std::fs::read(source.join("identity-fp32.onnx")).expect("model"));
    let manifest = format!(
        "\n[[models]]\nid = \"identity-fp32\"\nformat = \"onnx\"\nkinds = [\"tensor\"]\nlicence = \"Apache-2.0\"\nfiles = [{{ role = \"weights\", name = \"identity.onnx\", sha256 = \"{digest}\" }}]\n"
    );
    let models = sb.path().join("models");
    let config = sb.config("", "").replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", models.display()),
    );
    let import = |paths: &[&Path]| {
        let mut cmd = Command::new(airgate_tests::airgate_bin());
        cmd.args(["model", "import", "--config"])
            .arg(sb.config_path());
        cmd.args(paths);
        cmd.output().expect("airgate model import")
    };
    // No bundle in force yet: nothing to check against.
    sb.write_config(&config);
    let out = import(&[&source]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no bundle is in force"));

    sb.publish(&sb.sign(
        "v1",
        &(policy(1, &tenant(&["identity-fp32".to_owned()], "{ uids = [0] }")) + &manifest),
    ));
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    // The whole stick: the model is imported under the manifest's name,
    // everything else refused (exit 65) and left behind.
    let out = import(&[&source]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("imported") && stderr.contains("identity.onnx"),
        "{stderr}"
    );
    assert!(
        stderr.contains("refused") && stderr.contains("stray.bin"),
        "{stderr}"
    );
    let copied = models.join("identity.onnx");
    assert_eq!(
        sha256_hex(&std::fs::read(&copied).expect("imported")),
        digest
    );
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&copied).expect("stat");
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.mode() & 0o022, 0, "not writable by group or others");
    assert!(!models.join("stray.bin").exists());
    assert_eq!(
        std::fs::read_dir(&models).expect("dir").count(),
        1,
        "no temporary files left"
    );
    // Just the model: exit 0. The daemon loads it at its next look.
    let out = import(&[&source.join("identity-fp32.onnx")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It was refused for the missing file; the file's arrival retries it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(&d.socket, "/readyz", &[]).json()["models"]["identity-fp32"]["state"] == "refused" {
        assert!(
            std::time::Instant::now() < deadline,
            "not retried: {}",
            d.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    wait_model(&d, "identity-fp32");
}
