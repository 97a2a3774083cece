//! What changes between two bundles, and for whom: `airgate bundle diff`.
//!
//! Compared on the wire form, so every field the authority wrote shows up
//! under the name it wrote it with; lists of names (models, purposes,
//! identities) are compared as sets.

use std::collections::BTreeSet;

use serde_json::Value;

use super::WireBundle;

/// One difference, under the thing it belongs to (`tenant claims`, `model x`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub scope: String,
    pub what: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.scope, self.what)
    }
}

/// The differences from `old` to `new`, bundle-level first, then licences,
/// models and tenants, each sorted by id.
pub fn diff(old: &WireBundle, new: &WireBundle) -> Vec<Change> {
    let mut out = Vec::new();
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return out;
    };
    for key in [
        "schema",
        "bundle_version",
        "iss",
        "aud",
        "iat",
        "nbf",
        "exp",
        "tls_names",
    ] {
        fields(&mut out, "bundle", key, &old[key], &new[key]);
    }
    for (list, what) in [
        ("licences", "licence"),
        ("models", "model"),
        ("tenants", "tenant"),
    ] {
        let by_id = |v: &Value| -> Vec<(String, Value)> {
            let mut items: Vec<(String, Value)> = v[list]
                .as_array()
                .into_iter()
                .flatten()
                .map(|item| (item["id"].as_str().unwrap_or("").to_owned(), item.clone()))
                .collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            items
        };
        let (old_items, new_items) = (by_id(&old), by_id(&new));
        let ids: BTreeSet<&String> = old_items.iter().chain(&new_items).map(|i| &i.0).collect();
        for id in ids {
            let scope = format!("{what} {id}");
            let find =
                |items: &[(String, Value)]| items.iter().find(|i| &i.0 == id).map(|i| i.1.clone());
            match (find(&old_items), find(&new_items)) {
                (None, Some(_)) => out.push(Change {
                    scope,
                    what: "added".to_owned(),
                }),
                (Some(_), None) => out.push(Change {
                    scope,
                    what: "removed".to_owned(),
                }),
                (Some(o), Some(n)) => {
                    let keys: BTreeSet<String> = o
                        .as_object()
                        .into_iter()
                        .chain(n.as_object())
                        .flat_map(|m| m.keys().cloned())
                        .collect();
                    for key in keys.iter().filter(|k| *k != "id") {
                        fields(&mut out, &scope, key, &o[key.as_str()], &n[key.as_str()]);
                    }
                }
                (None, None) => {}
            }
        }
    }
    out
}

/// Records how `key` changed, recursing into objects and treating string
/// lists as sets.
fn fields(out: &mut Vec<Change>, scope: &str, key: &str, old: &Value, new: &Value) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                let (a, b) = (
                    o.get(k).unwrap_or(&Value::Null),
                    n.get(k).unwrap_or(&Value::Null),
                );
                fields(out, scope, &format!("{key}.{k}"), a, b);
            }
        }
        (Value::Array(o), Value::Array(n)) if all_scalars(o) && all_scalars(n) => {
            let name = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            let o: BTreeSet<String> = o.iter().map(name).collect();
            let n: BTreeSet<String> = n.iter().map(name).collect();
            let added: Vec<&String> = n.difference(&o).collect();
            let removed: Vec<&String> = o.difference(&n).collect();
            if !added.is_empty() {
                out.push(Change {
                    scope: scope.to_owned(),
                    what: format!("{key} + {}", join(&added)),
                });
            }
            if !removed.is_empty() {
                out.push(Change {
                    scope: scope.to_owned(),
                    what: format!("{key} - {}", join(&removed)),
                });
            }
        }
        _ => out.push(Change {
            scope: scope.to_owned(),
            what: format!("{key}: {old} -> {new}"),
        }),
    }
}

fn all_scalars(v: &[Value]) -> bool {
    v.iter().all(|x| !x.is_object() && !x.is_array())
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::sample;

    #[test]
    fn names_what_changes_for_whom() {
        let old: WireBundle = serde_json::from_value(sample()).expect("sample");
        let mut v = sample();
        v["bundle_version"] = 8.into();
        v["tenants"][1]["models"]
            .as_array_mut()
            .expect("models")
            .push("gemma-3-270m".into());
        v["tenants"][0]["limits"]["requests_per_minute"] = 60.into();
        v["models"][2]["files"][0]["sha256"] = "22".repeat(32).into();
        v["licences"].as_array_mut().expect("licences").remove(1);
        let new: WireBundle = serde_json::from_value(v).expect("edited");
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "bundle: bundle_version: 7 -> 8",
                "licence Apache-2.0: removed",
                &format!(
                    "model minilm-l3: files: [{{\"name\":\"paraphrase-MiniLM-L3-v2.onnx\",\"role\":\"weights\",\"sha256\":\"{}\"}}] -> [{{\"name\":\"paraphrase-MiniLM-L3-v2.onnx\",\"role\":\"weights\",\"sha256\":\"{}\"}}]",
                    "11".repeat(32),
                    "22".repeat(32)
                ),
                "tenant claims: limits.requests_per_minute: 600 -> 60",
                "tenant search: models + gemma-3-270m",
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }
}
