//! Signed policy bundles: the wire schema, its validation into domain types,
//! and (in [`verify`]) the JWS checks against local trust anchors.
//!
//! A bundle is parsed exactly once, here; everything downstream works on
//! [`Bundle`], whose invariants (every reference resolves, no cycles, no
//! tenant purpose a licence prohibits, ...) were checked on the way in.
//! Unknown fields are refused at every level.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::identity::{Principal, TenantId, TenantMap, TlsNameRules};
use crate::time::{Date, UnixTime};

pub mod diff;
pub mod sign;
pub mod verify;

/// The schema version this build understands.
pub const SCHEMA: u32 = 1;

/// The claims of a bundle JWS, exactly as signed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireBundle {
    pub schema: u32,
    pub bundle_version: u64,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    #[serde(default)]
    pub tls_names: WireTlsNames,
    pub licences: Vec<WireLicence>,
    pub models: Vec<WireModel>,
    pub tenants: Vec<WireTenant>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireTlsNames {
    #[serde(default)]
    pub dns_names: bool,
    #[serde(default)]
    pub common_name: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireLicence {
    /// An SPDX identifier (`Apache-2.0`) or a `LicenseRef-...`.
    pub id: String,
    pub name: String,
    pub commercial_use: bool,
    #[serde(default)]
    pub monthly_active_user_threshold: Option<u64>,
    #[serde(default)]
    pub prohibited_uses: Vec<String>,
    #[serde(default)]
    pub attribution: Option<String>,
    #[serde(default)]
    pub derivative_prefix: Option<String>,
    /// `YYYY-MM-DD`: the licence must be reviewed again by then.
    pub review_by: String,
    pub after_review: ReviewAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewAction {
    Flag,
    Refuse,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireModel {
    pub id: String,
    pub files: Vec<WireFile>,
    pub format: Format,
    pub kinds: Vec<Kind>,
    pub licence: String,
    #[serde(default)]
    pub derived_from: Option<String>,
    /// A classifier's output labels, in the order of its output's last dimension.
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireFile {
    pub role: String,
    pub name: String,
    pub sha256: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Gguf,
    Onnx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Chat,
    Completion,
    Embedding,
    Tensor,
    Classifier,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireTenant {
    pub id: String,
    pub identities: WireIdentities,
    pub purposes: Vec<String>,
    pub default_purpose: String,
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    pub user_identity: UserIdentity,
    #[serde(default)]
    pub user_cap: Option<UserCap>,
    #[serde(default)]
    pub content: WireContentRules,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireIdentities {
    #[serde(default)]
    pub uris: Vec<String>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub common_names: Vec<String>,
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
}

/// Per-tenant limits; absent means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    #[serde(default)]
    pub max_tokens_per_request: Option<u32>,
    /// What happens when a request's prompt and max_tokens would overrun
    /// what is left of `tokens_per_day`.
    #[serde(default)]
    pub over_budget: OverBudget,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverBudget {
    /// Refused before generation (429 until the budget's day ends).
    #[default]
    Refuse,
    /// Served with max_tokens lowered to what is left; refused only when
    /// not even the prompt fits.
    Truncate,
}

/// Where a request's end user is named.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum UserIdentity {
    /// The OpenAI request's `user` field.
    OpenaiUser,
    /// A request header, e.g. `x-end-user`.
    Header { name: String },
    /// A signed user assertion (a JWS) verified with these Ed25519 keys
    /// (base64url of the 32-byte public key, by key id).
    Assertion { keys: BTreeMap<String, String> },
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserCap {
    /// With `scope = "host"` this host's cap; with `"fleet_share"` the
    /// fleet-wide cap, of which this host takes `host_share`.
    pub max_users_per_month: u64,
    pub scope: CapScope,
    pub over_cap: OverCap,
    /// This host's fraction of a fleet-wide cap, in (0, 1]; only with
    /// `scope = "fleet_share"`, and required there.
    #[serde(default)]
    pub host_share: Option<f64>,
}

impl UserCap {
    /// The distinct users this host may admit per month.
    pub fn host_cap(&self) -> u64 {
        match (self.scope, self.host_share) {
            (CapScope::FleetShare, Some(share)) => {
                // Rounded down: the hosts' shares never add up past the fleet's cap.
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "share is validated in (0, 1]; the product is a non-negative count below 2^53 in practice"
                )]
                let cap = (self.max_users_per_month as f64 * share).floor() as u64;
                cap
            }
            _ => self.max_users_per_month,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapScope {
    /// The cap binds this host alone.
    Host,
    /// This host's share (`host_share`) of a fleet-wide cap.
    FleetShare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverCap {
    RefuseNewUsers,
    AllowAndFlag,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireContentRules {
    #[serde(default)]
    pub deny_literals: Vec<String>,
    #[serde(default)]
    pub deny_regex: Vec<String>,
    #[serde(default)]
    pub max_prompt_chars: Option<u32>,
    /// A classifier from the manifest that scores every prompt.
    #[serde(default)]
    pub guard: Option<Guard>,
}

/// A guard model: scores the prompt after policy allows; at or over the
/// threshold the request is denied (`guard_denied`); a guard that cannot
/// answer in time denies too (`guard_unavailable`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    pub model: String,
    /// The label whose probability is compared with the threshold.
    pub label: String,
    pub threshold: f64,
    #[serde(default = "default_guard_timeout_ms")]
    pub timeout_ms: u64,
    /// The purpose the guard model is used for, as the tenant declares it.
    #[serde(default = "default_guard_purpose")]
    pub purpose: String,
}

fn default_guard_timeout_ms() -> u64 {
    1000
}

fn default_guard_purpose() -> String {
    "content-moderation".to_owned()
}

/// A licence, validated.
#[derive(Clone, Debug, Serialize)]
pub struct Licence {
    pub id: String,
    pub name: String,
    pub commercial_use: bool,
    pub monthly_active_user_threshold: Option<u64>,
    pub prohibited_uses: BTreeSet<String>,
    pub attribution: Option<String>,
    pub derivative_prefix: Option<String>,
    pub review_by: Date,
    pub after_review: ReviewAction,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelFile {
    pub role: String,
    pub name: String,
    pub sha256: [u8; 32],
}

/// A model of the manifest, validated.
#[derive(Clone, Debug, Serialize)]
pub struct Model {
    pub id: String,
    pub files: Vec<ModelFile>,
    pub format: Format,
    pub kinds: BTreeSet<Kind>,
    pub licence: String,
    pub derived_from: Option<String>,
    /// This model's licence followed by each ancestor's (derived-from chain), deduplicated.
    pub licence_chain: Vec<String>,
    /// A classifier's output labels.
    pub labels: Vec<String>,
}

/// Compiled content rules.
#[derive(Clone, Debug)]
pub struct ContentRules {
    pub deny_literals: Vec<String>,
    /// The tenant's deny_regex patterns as one set: one pass over a prompt,
    /// one lazy-DFA cache, whatever the number of patterns.
    pub deny_regex: regex::RegexSet,
    pub max_prompt_chars: Option<u32>,
    pub guard: Option<Guard>,
}

/// A tenant, validated.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub purposes: BTreeSet<String>,
    pub default_purpose: String,
    pub models: BTreeSet<String>,
    pub limits: Limits,
    pub user_identity: UserIdentity,
    pub user_cap: Option<UserCap>,
    pub content: ContentRules,
}

/// A validated bundle: every reference resolves and every cross-check passed.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub version: u64,
    pub issuer: String,
    pub audience: String,
    pub issued_at: UnixTime,
    pub not_before: UnixTime,
    pub expires: UnixTime,
    pub licences: BTreeMap<String, Licence>,
    pub models: BTreeMap<String, Model>,
    pub tenants: BTreeMap<TenantId, Tenant>,
    pub tenant_map: TenantMap,
}

/// Why a bundle's content is refused; each names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("schema {found} is not supported (this airgate understands schema {SCHEMA})")]
    UnsupportedSchema { found: u32 },
    #[error("duplicate {what} {id:?}")]
    Duplicate { what: &'static str, id: String },
    #[error("{what} {id:?}: {reason}")]
    Invalid {
        what: &'static str,
        id: String,
        reason: String,
    },
    #[error("model {model:?} names licence {licence:?}, which the bundle does not define")]
    UnknownLicence { model: String, licence: String },
    #[error("model {model:?} is derived from {parent:?}, which is not in the manifest")]
    UnknownParent { model: String, parent: String },
    #[error("model {model:?}: its derived-from chain loops")]
    DerivationCycle { model: String },
    #[error(
        "model {model:?} derives from {ancestor:?}, whose licence {licence:?} requires derivative names to start with {prefix:?}"
    )]
    DerivativeName {
        model: String,
        ancestor: String,
        licence: String,
        prefix: String,
    },
    #[error("tenant {tenant:?} may use model {model:?}, which is not in the manifest")]
    UnknownModel { tenant: String, model: String },
    #[error("tenant {tenant:?}: default purpose {purpose:?} is not one of its purposes")]
    DefaultPurpose { tenant: String, purpose: String },
    #[error(
        "tenant {tenant:?} declares purpose {purpose:?}, which licence {licence:?} of model {model:?} prohibits"
    )]
    ProhibitedPurpose {
        tenant: String,
        purpose: String,
        model: String,
        licence: String,
    },
    #[error("identity {identity} is claimed by tenants {first:?} and {second:?}")]
    SharedIdentity {
        identity: String,
        first: String,
        second: String,
    },
    #[error(
        "the bundle's {patterns} deny_regex patterns (of {tenants} tenant(s)) compile to more than {limit} bytes together, the limit for one bundle"
    )]
    RegexBudget {
        patterns: usize,
        tenants: usize,
        limit: usize,
    },
}

fn invalid(what: &'static str, id: &str, reason: impl Into<String>) -> ContentError {
    ContentError::Invalid {
        what,
        id: id.to_owned(),
        reason: reason.into(),
    }
}

/// Ids of licences and models: printable, no spaces, bounded.
fn check_id(what: &'static str, id: &str) -> Result<(), ContentError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            id,
            "ids are 1 to 128 characters of A-Z a-z 0-9 - _ . : + /",
        ))
    }
}

fn parse_sha256(model: &str, hex: &str) -> Result<[u8; 32], ContentError> {
    let bad = || {
        invalid(
            "model",
            model,
            format!("sha256 {hex:?} is not 64 lower-case hex digits"),
        )
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The most that the deny_regex patterns of one bundle, every tenant's
/// together, may compile to: regex's size limit (its NFA, in bytes) as one
/// budget for all of them. A limit per pattern bounds nothing: 2,000
/// patterns such as `\w{0,20}N`, each far under one, took 8 s and 2.2 GB.
pub const REGEX_BUDGET_BYTES: usize = 4 << 20;

/// The lazy DFA's transition cache of one tenant's set (per searching
/// thread, grown as needed): one for the set, not one per pattern. As large
/// as the budget, so the lazy DFA can be built for any set within it (its
/// minimum grows with the NFA); without it every prompt would run the
/// much slower PikeVM.
const REGEX_DFA_BYTES: usize = REGEX_BUDGET_BYTES;

impl WireBundle {
    /// Checks everything that does not need the signature or the clock.
    pub fn validate(self) -> Result<Bundle, ContentError> {
        if self.schema != SCHEMA {
            return Err(ContentError::UnsupportedSchema { found: self.schema });
        }
        let mut licences = BTreeMap::new();
        for l in self.licences {
            check_id("licence", &l.id)?;
            let review_by = Date::parse(&l.review_by).map_err(|e| invalid("licence", &l.id, e))?;
            if let Some(p) = &l.derivative_prefix
                && p.is_empty()
            {
                return Err(invalid("licence", &l.id, "derivative_prefix is empty"));
            }
            let licence = Licence {
                id: l.id.clone(),
                name: l.name,
                commercial_use: l.commercial_use,
                monthly_active_user_threshold: l.monthly_active_user_threshold,
                prohibited_uses: l.prohibited_uses.into_iter().collect(),
                attribution: l.attribution,
                derivative_prefix: l.derivative_prefix,
                review_by,
                after_review: l.after_review,
            };
            if licences.insert(l.id.clone(), licence).is_some() {
                return Err(ContentError::Duplicate {
                    what: "licence",
                    id: l.id,
                });
            }
        }

        let mut models = BTreeMap::new();
        for m in self.models {
            check_id("model", &m.id)?;
            if m.files.is_empty() {
                return Err(invalid("model", &m.id, "no files"));
            }
            if m.kinds.is_empty() {
                return Err(invalid("model", &m.id, "no kinds"));
            }
            if !licences.contains_key(&m.licence) {
                return Err(ContentError::UnknownLicence {
                    model: m.id,
                    licence: m.licence,
                });
            }
            let mut files = Vec::new();
            let mut roles = BTreeSet::new();
            for f in m.files {
                // A NUL cuts a path short in every C call that opens it; other
                // controls hide in logs and listings. Like ids, names are bounded.
                if f.name.is_empty()
                    || f.name.len() > 255
                    || f.name.contains('/')
                    || f.name.starts_with('.')
                    || f.name.chars().any(char::is_control)
                {
                    return Err(invalid(
                        "model",
                        &m.id,
                        format!(
                            "file name {:?} must be a plain file name (1 to 255 bytes, no '/', no leading '.', no control characters)",
                            f.name
                        ),
                    ));
                }
                if !roles.insert(f.role.clone()) {
                    return Err(invalid(
                        "model",
                        &m.id,
                        format!("two files with role {:?}", f.role),
                    ));
                }
                files.push(ModelFile {
                    sha256: parse_sha256(&m.id, &f.sha256)?,
                    role: f.role,
                    name: f.name,
                });
            }
            let model = Model {
                id: m.id.clone(),
                files,
                format: m.format,
                kinds: m.kinds.into_iter().collect(),
                licence: m.licence,
                derived_from: m.derived_from,
                licence_chain: Vec::new(),
                labels: m.labels,
            };
            if models.insert(m.id.clone(), model).is_some() {
                return Err(ContentError::Duplicate {
                    what: "model",
                    id: m.id,
                });
            }
        }
        // Derived-from chains: resolve, refuse loops, enforce derivative names,
        // and record every licence that binds each model.
        let ids: Vec<String> = models.keys().cloned().collect();
        for id in &ids {
            let mut chain = vec![models[id].licence.clone()];
            let mut seen = BTreeSet::from([id.clone()]);
            let mut current = models[id].derived_from.clone();
            while let Some(parent) = current {
                let Some(p) = models.get(&parent) else {
                    return Err(ContentError::UnknownParent {
                        model: id.clone(),
                        parent,
                    });
                };
                if !seen.insert(parent.clone()) {
                    return Err(ContentError::DerivationCycle { model: id.clone() });
                }
                let licence = &licences[&p.licence];
                if let Some(prefix) = &licence.derivative_prefix
                    && !id.starts_with(prefix.as_str())
                {
                    return Err(ContentError::DerivativeName {
                        model: id.clone(),
                        ancestor: parent,
                        licence: licence.id.clone(),
                        prefix: prefix.clone(),
                    });
                }
                if !chain.contains(&p.licence) {
                    chain.push(p.licence.clone());
                }
                current = p.derived_from.clone();
            }
            if let Some(m) = models.get_mut(id) {
                m.licence_chain = chain;
            }
        }

        check_regex_budget(&self.tenants)?;
        let mut tenants = BTreeMap::new();
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        let mut rules = Vec::new();
        for t in self.tenants {
            let id = TenantId::parse(&t.id).map_err(|e| invalid("tenant", &t.id, e.to_string()))?;
            let purposes: BTreeSet<String> = t.purposes.into_iter().collect();
            if purposes.is_empty() {
                return Err(invalid("tenant", &t.id, "no purposes"));
            }
            if !purposes.contains(&t.default_purpose) {
                return Err(ContentError::DefaultPurpose {
                    tenant: t.id,
                    purpose: t.default_purpose,
                });
            }
            for model in &t.models {
                let Some(m) = models.get(model) else {
                    return Err(ContentError::UnknownModel {
                        tenant: t.id,
                        model: model.clone(),
                    });
                };
                for licence in &m.licence_chain {
                    if let Some(purpose) = purposes
                        .iter()
                        .find(|p| licences[licence].prohibited_uses.contains(*p))
                    {
                        return Err(ContentError::ProhibitedPurpose {
                            tenant: t.id,
                            purpose: purpose.clone(),
                            model: model.clone(),
                            licence: licence.clone(),
                        });
                    }
                }
            }
            let principals = principals(&t.identities);
            if principals.is_empty() {
                return Err(invalid("tenant", &t.id, "no identities"));
            }
            for (key, _) in &principals {
                if let Some(first) = claimed.insert(key.clone(), t.id.clone()) {
                    return Err(ContentError::SharedIdentity {
                        identity: key.clone(),
                        first,
                        second: t.id,
                    });
                }
            }
            let content = compile_content(&t.id, t.content)?;
            if let UserIdentity::Header { name } = &t.user_identity
                && http_header_name(name).is_none()
            {
                return Err(invalid(
                    "tenant",
                    &t.id,
                    format!("user header {name:?} is not a valid header name"),
                ));
            }
            if let UserIdentity::Assertion { keys } = &t.user_identity {
                if keys.is_empty() {
                    return Err(invalid("tenant", &t.id, "user assertion keys are empty"));
                }
                for (kid, key) in keys {
                    if crate::assertion::decode_key(key).is_none() {
                        return Err(invalid(
                            "tenant",
                            &t.id,
                            format!(
                                "user assertion key {kid:?} is not base64url of a 32-byte Ed25519 public key"
                            ),
                        ));
                    }
                }
            }
            if let Some(cap) = &t.user_cap {
                match (cap.scope, cap.host_share) {
                    (CapScope::FleetShare, None) => {
                        return Err(invalid(
                            "tenant",
                            &t.id,
                            "user_cap.scope = \"fleet_share\" needs host_share (this host's fraction of the fleet's cap)",
                        ));
                    }
                    (CapScope::FleetShare, Some(s)) if !(s > 0.0 && s <= 1.0) => {
                        return Err(invalid(
                            "tenant",
                            &t.id,
                            format!("user_cap.host_share = {s} is not in (0, 1]"),
                        ));
                    }
                    (CapScope::Host, Some(_)) => {
                        return Err(invalid(
                            "tenant",
                            &t.id,
                            "user_cap.host_share is only meaningful with scope = \"fleet_share\"",
                        ));
                    }
                    _ => {}
                }
            }
            rules.push((id.clone(), principals.into_iter().map(|(_, p)| p).collect()));
            let tenant = Tenant {
                id: id.clone(),
                purposes,
                default_purpose: t.default_purpose,
                models: t.models.into_iter().collect(),
                limits: t.limits,
                user_identity: t.user_identity,
                user_cap: t.user_cap,
                content,
            };
            if let Some(g) = &tenant.content.guard {
                let bad = |why: String| Err(invalid("tenant", &t.id, format!("guard: {why}")));
                let Some(m) = models.get(&g.model) else {
                    return bad(format!("model {:?} is not in the manifest", g.model));
                };
                if !m.kinds.contains(&Kind::Classifier) {
                    return bad(format!("model {:?} is not of kind \"classifier\"", g.model));
                }
                if !m.labels.contains(&g.label) {
                    return bad(format!(
                        "label {:?} is not one of model {:?}'s labels {:?}",
                        g.label, g.model, m.labels
                    ));
                }
                if !(g.threshold > 0.0 && g.threshold <= 1.0) {
                    return bad(format!("threshold {} is not in (0, 1]", g.threshold));
                }
                if !(1..=60_000).contains(&g.timeout_ms) {
                    return bad(format!("timeout_ms {} is not in 1..=60000", g.timeout_ms));
                }
                // The guard's use is the tenant's: allowed, for a declared purpose.
                if !tenant.models.contains(&g.model) {
                    return bad(format!(
                        "the tenant may not use its guard model {:?} (add it to models)",
                        g.model
                    ));
                }
                if !tenant.purposes.contains(&g.purpose) {
                    return bad(format!(
                        "the tenant does not declare the guard's purpose {:?}",
                        g.purpose
                    ));
                }
            }
            if tenants.insert(id, tenant).is_some() {
                return Err(ContentError::Duplicate {
                    what: "tenant",
                    id: t.id,
                });
            }
        }
        let tenant_map = TenantMap::new(rules).with_tls_names(TlsNameRules {
            dns_names: self.tls_names.dns_names,
            common_name: self.tls_names.common_name,
        });
        Ok(Bundle {
            version: self.bundle_version,
            issuer: self.iss,
            audience: self.aud,
            issued_at: UnixTime(self.iat),
            not_before: UnixTime(self.nbf),
            expires: UnixTime(self.exp),
            licences,
            models,
            tenants,
            tenant_map,
        })
    }
}

/// Lower-case header names made of token characters.
fn http_header_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(name)
}

/// Each identity as a unique key (for the shared-identity check) and a rule.
fn principals(ids: &WireIdentities) -> Vec<(String, Principal)> {
    let mut out = Vec::new();
    out.extend(
        ids.uris
            .iter()
            .map(|u| (format!("uri {u}"), Principal::Uri(u.clone()))),
    );
    out.extend(ids.dns_names.iter().map(|d| {
        (
            format!("dns {}", d.to_ascii_lowercase()),
            Principal::DnsName(d.clone()),
        )
    }));
    out.extend(
        ids.common_names
            .iter()
            .map(|c| (format!("cn {c}"), Principal::CommonName(c.clone()))),
    );
    out.extend(
        ids.uids
            .iter()
            .map(|u| (format!("uid {u}"), Principal::Uid(*u))),
    );
    out.extend(
        ids.gids
            .iter()
            .map(|g| (format!("gid {g}"), Principal::Gid(*g))),
    );
    out
}

/// Refuses a bundle whose deny_regex patterns, all tenants' together, do not
/// fit [`REGEX_BUDGET_BYTES`]; before any tenant's set is built, so a bundle
/// over it costs one compile stopped at the budget, not one per pattern.
fn check_regex_budget(tenants: &[WireTenant]) -> Result<(), ContentError> {
    let mut patterns = Vec::new();
    let mut with_patterns = 0;
    for t in tenants {
        for p in &t.content.deny_regex {
            check_regex_syntax(&t.id, p)?;
            patterns.push(p.as_str());
        }
        with_patterns += usize::from(!t.content.deny_regex.is_empty());
    }
    // One tenant's set is the bundle's: built once, in `compile_content`,
    // under the same budget.
    if with_patterns > 1 {
        compile_set(&patterns, with_patterns, |reason| {
            invalid("bundle", "deny_regex", reason)
        })?;
    }
    Ok(())
}

/// Parses one pattern, so a syntax error names its tenant and pattern: a
/// zero size limit stops the compile at its first NFA state, so this costs
/// a parse and no program.
fn check_regex_syntax(tenant: &str, pattern: &str) -> Result<(), ContentError> {
    match regex::RegexBuilder::new(pattern).size_limit(0).build() {
        Ok(_) | Err(regex::Error::CompiledTooBig(_)) => Ok(()),
        Err(e) => Err(invalid(
            "tenant",
            tenant,
            format!("deny_regex {pattern:?}: {e}"),
        )),
    }
}

/// `patterns` (of `tenants` tenants) as one set under the bundle's budget:
/// over it, the budget error with the numbers; any other failure (syntax
/// was checked before), `other` of its message.
fn compile_set(
    patterns: &[&str],
    tenants: usize,
    other: impl FnOnce(String) -> ContentError,
) -> Result<regex::RegexSet, ContentError> {
    regex::RegexSetBuilder::new(patterns)
        .size_limit(REGEX_BUDGET_BYTES)
        .dfa_size_limit(REGEX_DFA_BYTES)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => ContentError::RegexBudget {
                patterns: patterns.len(),
                tenants,
                limit,
            },
            e => other(e.to_string()),
        })
}

fn compile_content(tenant: &str, wire: WireContentRules) -> Result<ContentRules, ContentError> {
    let deny_regex = if wire.deny_regex.is_empty() {
        regex::RegexSet::empty()
    } else {
        let patterns: Vec<&str> = wire.deny_regex.iter().map(String::as_str).collect();
        compile_set(&patterns, 1, |reason| {
            invalid("tenant", tenant, format!("deny_regex: {reason}"))
        })?
    };
    if wire
        .deny_literals
        .iter()
        .any(|l| crate::content::fold(l).is_empty())
    {
        return Err(invalid(
            "tenant",
            tenant,
            "an empty deny_literal would deny everything",
        ));
    }
    Ok(ContentRules {
        deny_literals: wire
            .deny_literals
            .into_iter()
            .map(|l| crate::content::fold(&l))
            .collect(),
        deny_regex,
        max_prompt_chars: wire.max_prompt_chars,
        guard: wire.guard,
    })
}

#[cfg(test)]
pub(crate) mod tests;
