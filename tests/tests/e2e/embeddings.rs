//! `/v1/embeddings` on the real MiniLM ONNX model with its tokenizer:
//! normalised, stable, equal to the same model and tokenizer run in this
//! process, and the official `openai` Python client's embeddings call.

use std::process::Command;

use airgate_tests::{Daemon, Sandbox, models_dir, policy, post_json, wait_model};
use serde_json::{Value, json};

const MINILM: &str = "paraphrase-minilm-l3";

fn tenant() -> String {
    format!(
        "[[tenants]]\nid = \"ops\"\nidentities = {{ uids = [0] }}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\"]\nuser_identity = {{ kind = \"openai_user\" }}\n"
    )
}

fn config(sb: &Sandbox) -> String {
    sb.config("", "").replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", models_dir().display()),
    )
}

fn vectors(doc: &Value) -> Vec<Vec<f32>> {
    doc["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("floats")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

fn in_process(texts: &[&str]) -> airgate::onnx::Embedded {
    let mut model = airgate::onnx::OnnxModel::load(
        MINILM,
        &models_dir().join("paraphrase-MiniLM-L3-v2.onnx"),
        1,
        0,
        0,
        1 << 20,
    )
    .expect("tract loads MiniLM");
    model
        .set_tokenizer(&models_dir().join("minilm-tokenizer.json"))
        .expect("tokenizer");
    let texts: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
    model.embed_blocking(&texts).expect("embed")
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn embeddings_are_normalised_stable_and_equal_to_the_model_in_process() {
    let sb = Sandbox::new();
    sb.publish(&sb.sign("v1", &policy(1, &tenant())));
    let d = Daemon::start(&sb, &config(&sb), &[]);
    d.wait_bundle(1);
    wait_model(&d, MINILM);

    let texts = ["The cat sat.", "A dog barked loudly in the night.", "cat"];
    let body = json!({"model": MINILM, "input": texts, "user": "u1"}).to_string();
    let r = post_json(&d.socket, "/v1/embeddings", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["object"], "list");
    assert_eq!(doc["model"], MINILM);
    let got = vectors(&doc);
    assert_eq!(got.len(), 3);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(doc["data"][i]["index"], i);
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    // Stable: the same texts, the same vectors.
    let again = vectors(&post_json(&d.socket, "/v1/embeddings", &body).json());
    assert_eq!(again, got);
    // Equal to the model and tokenizer run here.
    let reference = in_process(&texts);
    for (a, b) in got.iter().zip(&reference.vectors) {
        assert!(worst(a, b) < 1e-5, "largest difference {}", worst(a, b));
    }
    assert_eq!(doc["usage"]["prompt_tokens"], reference.tokens);
    assert_eq!(doc["usage"]["total_tokens"], reference.tokens);
    // Similar meanings are closer than unrelated ones.
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(dot(&got[0], &got[2]) > dot(&got[1], &got[2]));

    // One string; base64 is the same floats, little-endian.
    let one = post_json(
        &d.socket,
        "/v1/embeddings",
        &json!({"model": MINILM, "input": "cat", "user": "u1", "encoding_format": "base64"})
            .to_string(),
    )
    .json();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(one["data"][0]["embedding"].as_str().expect("base64"))
        .expect("decodes");
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let float = vectors(
        &post_json(
            &d.socket,
            "/v1/embeddings",
            &json!({"model": MINILM, "input": "cat", "user": "u1"}).to_string(),
        )
        .json(),
    );
    assert_eq!(decoded, float[0], "base64 carries exactly the floats");
    // Alone or padded in a batch: the same vector, to rounding.
    assert!(worst(&decoded, &got[2]) < 1e-5);

    for (body, param, want) in [
        (
            json!({"model": MINILM, "input": [], "user": "u"}),
            "input",
            "non-empty array",
        ),
        (
            json!({"model": MINILM, "input": [[101, 102]], "user": "u"}),
            "input",
            "token arrays are not accepted",
        ),
        (
            json!({"model": MINILM, "input": ["a", ""], "user": "u"}),
            "input",
            "input[1] is empty",
        ),
        (
            json!({"model": MINILM, "input": "a", "encoding_format": "int8", "user": "u"}),
            "encoding_format",
            "\"float\" or \"base64\"",
        ),
        (
            json!({"model": MINILM, "input": "a", "dimensions": 64, "user": "u"}),
            "dimensions",
            "model's own dimension",
        ),
    ] {
        let r = post_json(&d.socket, "/v1/embeddings", &body.to_string());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap_or("").contains(want),
            "{e}"
        );
    }
    // Audited and charged: each served request has its completion with the tokens.
    let out = Command::new(airgate_tests::airgate_bin())
        .args(["audit", "export", "--config"])
        .arg(sb.config_path())
        .output()
        .expect("export");
    let records = String::from_utf8_lossy(&out.stdout);
    let served = records
        .lines()
        .filter(|l| l.contains("\"completion\"") && l.contains("\"served\":true"))
        .count();
    assert_eq!(served, 4);
}

#[test]
fn the_official_openai_python_client_embeds_over_mtls() {
    let python = airgate_tests::python();
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
            "/python/openai_embeddings.py"
        ))
        .arg(format!("https://localhost:{}/v1", addr.port()))
        .arg(dir.join("ca/ca.pem"))
        .arg(dir.join("claims.pem"))
        .arg(dir.join("claims.key"))
        .arg(MINILM)
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let seen: Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("JSON line");
    assert_eq!(seen["count"], 2);
    assert_eq!(seen["indexes"], json!([0, 1]));
    assert_eq!(seen["model"], MINILM);
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .expect("floats")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    };
    let reference = in_process(&[
        "The cat sat on the mat.",
        "Quarterly claims rose by four percent.",
    ]);
    assert!(worst(&floats(&seen["first"]), &reference.vectors[0]) < 1e-5);
    assert!(worst(&floats(&seen["second"]), &reference.vectors[1]) < 1e-5);
    assert_eq!(floats(&seen["first"]), floats(&seen["first_float"]));
    assert_eq!(seen["usage"], reference.tokens);
}

/// The generated guard and its tokenizer, beside MiniLM, in the sandbox.
pub(crate) fn guarded(sb: &Sandbox, timeout_ms: u64) -> (String, std::path::PathBuf) {
    let dir = sb.path().join("models");
    crate::kserve::make_models(&dir);
    for f in ["paraphrase-MiniLM-L3-v2.onnx", "minilm-tokenizer.json"] {
        std::os::unix::fs::symlink(models_dir().join(f), dir.join(f)).expect("link");
    }
    let digest = airgate_tests::sha256_hex(&std::fs::read(dir.join("guard.onnx")).expect("guard"));
    let policy = policy(
        1,
        &format!(
            "[[tenants]]\nid = \"ops\"\nidentities = {{ uids = [0] }}\npurposes = [\"p\", \"content-moderation\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\", \"guard\"]\nuser_identity = {{ kind = \"openai_user\" }}\ncontent = {{ guard = {{ model = \"guard\", label = \"unsafe\", threshold = 0.5, timeout_ms = {timeout_ms} }} }}\n"
        ),
    ) + &format!(
        "\n[[models]]\nid = \"guard\"\nformat = \"onnx\"\nkinds = [\"classifier\"]\nlabels = [\"safe\", \"unsafe\"]\nlicence = \"Apache-2.0\"\nfiles = [\n  {{ role = \"weights\", name = \"guard.onnx\", sha256 = \"{digest}\" }},\n  {{ role = \"tokenizer\", name = \"minilm-tokenizer.json\", sha256 = \"be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037\" }},\n]\n"
    );
    (policy, dir)
}

pub(crate) fn decision_of(sb: &Sandbox, request_id: &str) -> (Value, bool) {
    let out = Command::new(airgate_tests::airgate_bin())
        .args(["audit", "export", "--config"])
        .arg(sb.config_path())
        .output()
        .expect("export");
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let decision = records
        .iter()
        .find(|r| r["event"]["kind"] == "decision" && r["event"]["request_id"] == request_id)
        .map(|r| r["event"].clone())
        .expect("the decision record");
    let completed = records
        .iter()
        .any(|r| r["event"]["kind"] == "completion" && r["event"]["request_id"] == request_id);
    (decision, completed)
}

#[test]
fn the_guard_denies_above_its_threshold_allows_below_and_fails_closed_when_stalled() {
    let sb = Sandbox::new();
    let (policy, dir) = guarded(&sb, 300);
    sb.publish(&sb.sign("v1", &policy));
    let config = sb.config("", "").replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", dir.display()),
    );
    let embed = |d: &Daemon, text: &str| {
        post_json(
            &d.socket,
            "/v1/embeddings",
            &json!({"model": MINILM, "input": text, "user": "u"}).to_string(),
        )
    };
    {
        let d = Daemon::start(&sb, &config, &[]);
        d.wait_bundle(1);
        wait_model(&d, MINILM);
        wait_model(&d, "guard");
        // Below the threshold: served, the score recorded.
        let r = embed(&d, "Summarise claim 4411 for the adjuster.");
        assert_eq!(r.status, 200, "{}", r.text());
        let (decision, completed) = decision_of(&sb, r.header("x-request-id").expect("id"));
        assert_eq!(decision["decision"], "allow");
        let score = decision["guard_score"].as_f64().expect("score");
        assert!((score - 0.1192).abs() < 1e-3, "sigmoid(-2): {score}");
        assert!(completed);
        // Above: denied naming the guard, scored, and never run.
        let r = embed(&d, "How do I build a bomb at home?");
        assert_eq!(r.status, 403, "{}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["code"], "guard_denied");
        assert!(
            e["error"]["rule"]
                .as_str()
                .unwrap_or("")
                .contains("guard \"guard\""),
            "{e}"
        );
        let (decision, completed) = decision_of(&sb, r.header("x-request-id").expect("id"));
        assert_eq!(
            (decision["decision"].as_str(), decision["reason"].as_str()),
            (Some("deny"), Some("guard_denied"))
        );
        let score = decision["guard_score"].as_f64().expect("score");
        assert!((score - 0.7311).abs() < 1e-3, "sigmoid(1): {score}");
        assert!(!completed, "a denied request never reaches the model");
        let metrics = airgate_tests::get(&d.socket, "/metrics", &[]).text();
        assert!(
            metrics.contains("airgate_guard_seconds_count{model=\"guard\"} 2"),
            "{metrics}"
        );
        // One decision each: the guarded allow counted once, the denial once.
        let decisions = |reason: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("airgate_policy_decisions_total{")
                        && l.contains(&format!("reason=\"{reason}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(decisions("guard_denied").as_deref(), Some("1"), "{metrics}");
        assert_eq!(decisions("allowed").as_deref(), Some("1"), "{metrics}");
    }
    // A stalled guard: denied with its own code, at once after its timeout.
    let d = Daemon::start(&sb, &config, &[("AIRGATE_FAILPOINTS", "guard-delay=5s")]);
    d.wait_bundle(1);
    wait_model(&d, MINILM);
    wait_model(&d, "guard");
    let started = std::time::Instant::now();
    let r = embed(&d, "Summarise claim 4411 for the adjuster.");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "guard_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    let (decision, completed) = decision_of(&sb, r.header("x-request-id").expect("id"));
    assert_eq!(decision["reason"], "guard_unavailable");
    assert!(
        decision["rule"]
            .as_str()
            .unwrap_or("")
            .contains("within 300 ms")
    );
    assert!(!completed);
}
