//! The policy authority's commands: `airgate keygen` and `airgate bundle
//! sign | prepare | attach | verify | inspect | diff`. They read and write
//! files; the checks themselves are policy's, the same the daemon runs.

use std::path::{Path, PathBuf};

use airgate_policy::bundle::WireBundle;
use airgate_policy::bundle::diff::diff;
use airgate_policy::bundle::sign::{attach, input_algorithm, sign, signing_input};
use airgate_policy::bundle::verify::{
    SigningAlgorithm, TrustAnchors, decode_unverified, verify, verify_signed,
};
use base64::Engine as _;

use crate::bundle::SystemClock;
use crate::config::Config;
use crate::keys;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// Bad arguments or unusable keys/configuration (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The bundle or policy given is refused (exit 65).
    #[error("{0}")]
    Refused(String),
    /// A file could not be written (exit 73).
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AuthorityError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => crate::exit::CONFIG,
            Self::Refused(_) => crate::exit::DATA,
            Self::Write { .. } => crate::exit::CANT_CREATE,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    std::fs::read(path).map_err(|e| AuthorityError::Usage(format!("{}: {e}", path.display())))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), AuthorityError> {
    std::fs::write(path, bytes).map_err(|source| AuthorityError::Write {
        path: path.to_owned(),
        source,
    })
}

/// `30d`, `12h`, `90m`, `3600s`.
pub fn parse_validity(s: &str) -> Result<i64, AuthorityError> {
    let bad = || AuthorityError::Usage(format!("--valid-for {s:?}: expected e.g. 30d, 12h, 90m"));
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit = match unit {
        "d" => 86_400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).filter(|v| *v > 0).ok_or_else(bad)
}

/// Reads a policy source (TOML, or JSON by extension), fills in the times it
/// leaves out, and checks it exactly as a host would (less the signature).
pub fn load_policy(path: &Path, valid_for: &str) -> Result<WireBundle, AuthorityError> {
    let text = String::from_utf8(read(path)?)
        .map_err(|_| AuthorityError::Usage(format!("{}: not UTF-8", path.display())))?;
    let mut value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| AuthorityError::Refused(format!("{}: {e}", path.display())))?
    } else {
        let table: toml::Table = text
            .parse()
            .map_err(|e| AuthorityError::Refused(format!("{}: {e}", path.display())))?;
        serde_json::to_value(table)
            .map_err(|e| AuthorityError::Refused(format!("{}: {e}", path.display())))?
    };
    let obj = value.as_object_mut().ok_or_else(|| {
        AuthorityError::Refused(format!("{}: the policy must be a table", path.display()))
    })?;
    let now = airgate_policy::time::Clock::now(&SystemClock).seconds();
    let validity = parse_validity(valid_for)?;
    obj.entry("iat").or_insert(now.into());
    obj.entry("nbf").or_insert(now.into());
    obj.entry("exp").or_insert((now + validity).into());
    let wire: WireBundle = serde_json::from_value(value)
        .map_err(|e| AuthorityError::Refused(format!("{}: {e}", path.display())))?;
    wire.clone()
        .validate()
        .map_err(|e| AuthorityError::Refused(format!("{}: {e}", path.display())))?;
    Ok(wire)
}

pub fn keygen(dir: &Path, name: &str) -> Result<String, AuthorityError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(AuthorityError::Usage(format!(
            "--name {name:?}: use 1 to 128 of A-Z a-z 0-9 - _ ."
        )));
    }
    let (private, public) = keys::generate(dir, name).map_err(|e| match e {
        keys::KeyFileError::Io { path, source } => AuthorityError::Write { path, source },
        other => AuthorityError::Usage(other.to_string()),
    })?;
    let fingerprint = keys::read_public_key(&public)
        .map_err(|e| AuthorityError::Usage(e.to_string()))?
        .fingerprint();
    Ok(format!(
        "wrote {} (private, mode 0600: keep it offline)\nwrote {} (public: install on hosts as trust anchor key_id = {name:?})\nsha256 of the public key: {fingerprint}",
        private.display(),
        public.display()
    ))
}

fn default_key_id(key: &Path) -> Result<String, AuthorityError> {
    key.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .ok_or_else(|| AuthorityError::Usage("pass --key-id".to_owned()))
}

pub fn bundle_sign(
    key: &Path,
    key_id: Option<&str>,
    valid_for: &str,
    policy: &Path,
    out: &Path,
) -> Result<String, AuthorityError> {
    let wire = load_policy(policy, valid_for)?;
    let private = keys::read_private_key(key).map_err(|e| AuthorityError::Usage(e.to_string()))?;
    let key_id = match key_id {
        Some(k) => k.to_owned(),
        None => default_key_id(key)?,
    };
    let token = sign(&wire, &key_id, private.algorithm, &private.pkcs8)
        .map_err(|e| AuthorityError::Usage(e.to_string()))?;
    write(out, format!("{token}\n").as_bytes())?;
    Ok(format!(
        "wrote {}: bundle_version {} for audience {:?}, signed by {key_id:?} ({}), expires {}",
        out.display(),
        wire.bundle_version,
        wire.aud,
        private.algorithm.jose(),
        wire.exp
    ))
}

pub fn bundle_prepare(
    key_id: &str,
    alg: &str,
    valid_for: &str,
    policy: &Path,
    out: &Path,
) -> Result<String, AuthorityError> {
    let alg = match alg.to_ascii_lowercase().as_str() {
        "eddsa" | "ed25519" => SigningAlgorithm::EdDsa,
        "es256" | "p256" | "p-256" => SigningAlgorithm::Es256,
        other => {
            return Err(AuthorityError::Usage(format!(
                "--alg {other:?}: eddsa or es256"
            )));
        }
    };
    let wire = load_policy(policy, valid_for)?;
    let input =
        signing_input(&wire, key_id, alg).map_err(|e| AuthorityError::Usage(e.to_string()))?;
    write(out, input.as_bytes())?;
    Ok(format!(
        "wrote {} ({} bytes): sign exactly these bytes with {key_id:?}, e.g.\n  openssl pkeyutl -sign -inkey KEY.pem -rawin -in {} -out signature.bin\nthen: airgate bundle attach {} signature.bin --pub KEY.pub -o bundle.jwt",
        out.display(),
        input.len(),
        out.display(),
        out.display()
    ))
}

pub fn bundle_attach(
    input: &Path,
    signature: &Path,
    public_key: &Path,
    out: &Path,
) -> Result<String, AuthorityError> {
    let input = String::from_utf8(read(input)?)
        .map_err(|_| AuthorityError::Refused("signing input is not text".to_owned()))?;
    let raw = read(signature)?;
    // Raw bytes as most tools write them, or base64 text of them.
    let sig = match std::str::from_utf8(&raw).ok().map(str::trim).and_then(|t| {
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
            .ok()
    }) {
        Some(decoded) if !decoded.is_empty() => decoded,
        _ => raw,
    };
    let token = attach(&input, &sig).map_err(|e| AuthorityError::Refused(e.to_string()))?;
    let public =
        keys::read_public_key(public_key).map_err(|e| AuthorityError::Usage(e.to_string()))?;
    let alg = input_algorithm(&input).map_err(|e| AuthorityError::Refused(e.to_string()))?;
    if alg != public.algorithm {
        return Err(AuthorityError::Usage(format!(
            "the signing input is for {}, the public key is {}",
            alg.jose(),
            public.algorithm.jose()
        )));
    }
    let (kid, wire) =
        decode_unverified(token.as_bytes()).map_err(|e| AuthorityError::Refused(e.to_string()))?;
    let anchors = TrustAnchors::new([public.anchor(&kid)]);
    verify_signed(token.as_bytes(), &anchors, &wire.aud)
        .map_err(|e| AuthorityError::Refused(format!("not written: {e}")))?;
    write(out, format!("{token}\n").as_bytes())?;
    Ok(format!(
        "wrote {}: signature verified with {}",
        out.display(),
        public_key.display()
    ))
}

/// Trust anchors from a directory of `KEYID.pub` files.
pub fn anchors_from_dir(dir: &Path) -> Result<TrustAnchors, AuthorityError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| AuthorityError::Usage(format!("{}: {e}", dir.display())))?;
    let mut anchors = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pub") {
            continue;
        }
        let id = default_key_id(&path)?;
        let key = keys::read_public_key(&path).map_err(|e| AuthorityError::Usage(e.to_string()))?;
        anchors.push(key.anchor(&id));
    }
    if anchors.is_empty() {
        return Err(AuthorityError::Usage(format!(
            "{}: no KEYID.pub trust anchors",
            dir.display()
        )));
    }
    Ok(TrustAnchors::new(anchors))
}

pub fn bundle_verify(
    trust: Option<&Path>,
    config: Option<&Path>,
    audience: Option<&str>,
    bundle: &Path,
) -> Result<String, AuthorityError> {
    let token = read(bundle)?;
    let (anchors, configured_audience) = match (trust, config) {
        (Some(dir), _) => (anchors_from_dir(dir)?, None),
        (None, Some(path)) => {
            let c = Config::load(path).map_err(|e| AuthorityError::Usage(e.to_string()))?;
            (c.trust.anchors(), c.policy.audience)
        }
        (None, None) => {
            return Err(AuthorityError::Usage(
                "pass --trust DIR or --config FILE".to_owned(),
            ));
        }
    };
    let (_, claimed) =
        decode_unverified(&token).map_err(|e| AuthorityError::Refused(e.to_string()))?;
    let audience = audience
        .map(str::to_owned)
        .or(configured_audience)
        .unwrap_or(claimed.aud);
    let now = airgate_policy::time::Clock::now(&SystemClock);
    let v = verify(&token, &anchors, &audience, now)
        .map_err(|e| AuthorityError::Refused(format!("{}: REFUSED: {e}", bundle.display())))?;
    let b = &v.bundle;
    let mut report = format!(
        "{}: OK\n  version {}  audience {:?}  issuer {:?}\n  signed by {:?}  digest {}\n  valid {} .. {}\n  {} licences, {} models, {} tenants",
        bundle.display(),
        b.version,
        b.audience,
        b.issuer,
        v.key_id,
        v.digest,
        b.not_before.seconds(),
        b.expires.seconds(),
        b.licences.len(),
        b.models.len(),
        b.tenants.len()
    );
    let today = now.date();
    for l in b.licences.values() {
        if today > l.review_by {
            report.push_str(&format!(
                "\n  WARNING: licence {} was due for review by {} (after review: {:?})",
                l.id, l.review_by, l.after_review
            ));
        }
    }
    Ok(report)
}

pub fn bundle_inspect(bundle: &Path, json: bool) -> Result<String, AuthorityError> {
    let token = read(bundle)?;
    let (kid, wire) =
        decode_unverified(&token).map_err(|e| AuthorityError::Refused(e.to_string()))?;
    if json {
        return serde_json::to_string_pretty(&wire)
            .map_err(|e| AuthorityError::Refused(e.to_string()));
    }
    let mut out = format!(
        "{} (signature NOT checked; use `airgate bundle verify`)\n  version {}  schema {}  audience {:?}  issuer {:?}  key id {kid:?}\n  issued {}  valid {} .. {}",
        bundle.display(),
        wire.bundle_version,
        wire.schema,
        wire.aud,
        wire.iss,
        wire.iat,
        wire.nbf,
        wire.exp
    );
    out.push_str("\nlicences:");
    for l in &wire.licences {
        out.push_str(&format!(
            "\n  {}  {:?}  commercial_use={}  mau_threshold={}  prohibited={:?}  review_by={} ({:?})",
            l.id,
            l.name,
            l.commercial_use,
            l.monthly_active_user_threshold
                .map_or_else(|| "none".to_owned(), |t| t.to_string()),
            l.prohibited_uses,
            l.review_by,
            l.after_review
        ));
    }
    out.push_str("\nmodels:");
    for m in &wire.models {
        out.push_str(&format!(
            "\n  {}  {:?} {:?}  licence {}{}",
            m.id,
            m.format,
            m.kinds,
            m.licence,
            m.derived_from
                .as_ref()
                .map_or_else(String::new, |p| format!("  derived from {p}"))
        ));
        for f in &m.files {
            out.push_str(&format!("\n    {} {} sha256 {}", f.role, f.name, f.sha256));
        }
    }
    out.push_str("\ntenants:");
    for t in &wire.tenants {
        out.push_str(&format!(
            "\n  {}  purposes {:?} (default {:?})  models {:?}",
            t.id, t.purposes, t.default_purpose, t.models
        ));
    }
    Ok(out)
}

pub fn bundle_diff(old: &Path, new: &Path) -> Result<String, AuthorityError> {
    let decode = |p: &Path| -> Result<WireBundle, AuthorityError> {
        let (_, w) = decode_unverified(&read(p)?)
            .map_err(|e| AuthorityError::Refused(format!("{}: {e}", p.display())))?;
        Ok(w)
    };
    let (a, b) = (decode(old)?, decode(new)?);
    let changes = diff(&a, &b);
    if changes.is_empty() {
        return Ok("no differences".to_owned());
    }
    Ok(changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n"))
}
