//! `airgate sbom`: an AI bill of materials for what the host serves, as
//! CycloneDX 1.6 JSON (ML-BOM): each model of the bundle in force with its
//! files' digests, its licences (the derived-from chain, as an SPDX
//! expression) and its provenance (ancestors, and dependencies on the
//! models it derives from).

use std::path::Path;

use airgate_policy::bundle::Bundle;
use serde_json::{Value, json};

use crate::keys::hex;

/// A URN UUID from the bundle's digest: the same bundle, the same serial.
fn serial(digest: &str) -> String {
    let h: String = digest
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(32)
        .collect();
    let h = format!("{h:0<32}");
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn property(name: &str, value: impl Into<String>) -> Value {
    json!({"name": format!("airgate:{name}"), "value": value.into()})
}

/// The document for `bundle` (version and digest as accepted), at `now` (RFC 3339).
pub fn document(bundle: &Bundle, digest: &str, now: &str) -> Value {
    let components: Vec<Value> = bundle
        .models
        .values()
        .map(|m| {
            let licence = &bundle.licences[&m.licence];
            let files: Vec<Value> = m
                .files
                .iter()
                .map(|f| {
                    json!({
                        "type": "file",
                        "bom-ref": format!("model:{}:file:{}", m.id, f.role),
                        "name": f.name,
                        "hashes": [{"alg": "SHA-256", "content": hex(&f.sha256)}],
                        "properties": [property("role", f.role.clone())],
                    })
                })
                .collect();
            let weights = m
                .files
                .iter()
                .find(|f| f.role == "weights")
                .or_else(|| m.files.first());
            let mut properties = vec![
                property("format", format!("{:?}", m.format).to_lowercase()),
                property(
                    "kinds",
                    m.kinds
                        .iter()
                        .map(|k| format!("{k:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                property("licence", m.licence.clone()),
                property("licence_name", licence.name.clone()),
                property("licence_review_by", licence.review_by.to_string()),
                property("commercial_use", licence.commercial_use.to_string()),
            ];
            if let Some(t) = licence.monthly_active_user_threshold {
                properties.push(property("monthly_active_user_threshold", t.to_string()));
            }
            if let Some(a) = &licence.attribution {
                properties.push(property("attribution", a.clone()));
            }
            for p in &licence.prohibited_uses {
                properties.push(property("prohibited_use", p.clone()));
            }
            let mut c = json!({
                "type": "machine-learning-model",
                "bom-ref": format!("model:{}", m.id),
                "name": m.id,
                "version": weights.map_or_else(String::new, |f| format!("sha256:{}", hex(&f.sha256))),
                "hashes": weights.map(|f| vec![json!({"alg": "SHA-256", "content": hex(&f.sha256)})]).unwrap_or_default(),
                // Every licence of the chain binds the model.
                "licenses": [{"expression": m.licence_chain.join(" AND ")}],
                "components": files,
                "properties": properties,
            });
            if let Some(parent) = &m.derived_from {
                c["pedigree"] = json!({
                    "ancestors": [{
                        "type": "machine-learning-model",
                        "bom-ref": format!("model:{}:ancestor:{parent}", m.id),
                        "name": parent,
                    }],
                    "notes": format!("{} is derived from {parent}", m.id),
                });
            }
            c
        })
        .collect();
    let dependencies: Vec<Value> = bundle
        .models
        .values()
        .map(|m| {
            json!({
                "ref": format!("model:{}", m.id),
                "dependsOn": m.derived_from.iter().map(|p| format!("model:{p}")).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": serial(digest),
        "version": 1,
        "metadata": {
            "timestamp": now,
            "tools": {"components": [{"type": "application", "name": "airgate", "version": env!("CARGO_PKG_VERSION")}]},
            "properties": [
                property("bundle_version", bundle.version.to_string()),
                property("bundle_digest", digest),
                property("bundle_issuer", bundle.issuer.clone()),
            ],
        },
        "components": components,
        "dependencies": dependencies,
    })
}

/// `airgate sbom`: the document for the bundle in force on this host.
pub fn run(config: &Path, out: Option<&Path>) -> Result<(), String> {
    let config = crate::config::Config::load(config).map_err(|e| e.to_string())?;
    let policy = crate::bundle::Policy::open(&config)
        .map_err(|e| format!("cannot read the policy store: {e}"))?;
    let active = policy.active().ok_or(
        "no bundle is in force: the bill of materials lists the models of the bundle in force",
    )?;
    let now = crate::report::rfc3339(crate::bundle::system_time_now());
    let doc = document(&active.verified.bundle, &active.verified.digest, &now);
    let mut text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    text.push('\n');
    match out {
        Some(path) => crate::bundle::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
