//! The policy gate on the inference path: request -> facts -> `decide` ->
//! admission. Everything a decision needs is taken from the request here,
//! once; policy sees only facts.
//!
//! End users are never handled in clear past this point: they become a
//! [`UserKey`], HMAC-SHA256 under a host secret kept in the state
//! directory, keyed per tenant, so equal users of one tenant count once
//! and the key reveals nothing.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;

use airgate_policy::admission::{Admission, Ticket};
use airgate_policy::assertion::verify_user_assertion;
use airgate_policy::audit::DecisionRecord;
use airgate_policy::bundle::{Kind, UserIdentity};
use airgate_policy::decision::{
    Allow, Decision, Deny, Reason, RequestFacts, UserKey, decide, decide_use,
};
use airgate_policy::identity::Identity;
use http::HeaderMap;
use serde_json::Value;

use crate::bounded::clip;

use crate::bundle::Active;
use crate::connection::Conn;
use crate::metrics::DecisionLabels;
use crate::server::Shared;

/// The request header naming one of the tenant's purposes.
pub const PURPOSE_HEADER: &str = "airgate-purpose";
/// The request header carrying a signed user assertion (a JWS).
pub const ASSERTION_HEADER: &str = "airgate-user-assertion";
/// Generation bound assumed when a request names none.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Longest end-user id accepted, in bytes.
const MAX_USER_BYTES: usize = 256;
/// Longest model name or purpose kept: longer ones are clipped (no
/// manifest id or purpose is this long, so a clipped one matches nothing).
const MAX_NAME_BYTES: usize = 256;
/// Longest transport identity (as JSON) a record keeps.
const MAX_IDENTITY_BYTES: usize = 4096;

/// Keyed hashing of end-user ids.
pub struct UserHasher {
    key: ring::hmac::Key,
}

impl UserHasher {
    /// Reads a secret an operator provides (32 bytes); never creates it.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let secret = std::fs::read(path)?;
        if secret.len() != 32 {
            return Err(std::io::Error::other(format!(
                "{} holds {} bytes; a user-hashing secret is 32",
                path.display(),
                secret.len()
            )));
        }
        Ok(Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// Reads `path` (32 bytes), creating it with mode 0600 at first start.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let secret = match std::fs::read(path) {
            Ok(s) if s.len() == 32 => s,
            Ok(s) => {
                return Err(std::io::Error::other(format!(
                    "{} holds {} bytes; a user-hashing secret is 32",
                    path.display(),
                    s.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                file.write_all(&secret)?;
                file.sync_all()?;
                secret
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// Names the secret without revealing it: two hosts with the same
    /// fingerprint hash every user alike (their counts merge). The tag's
    /// 0xff byte cannot occur in a tenant id, so it is no user's hash.
    pub fn fingerprint(&self) -> String {
        crate::keys::hex(
            ring::hmac::sign(&self.key, b"\xffairgate-user-secret-fingerprint-v1").as_ref(),
        )
    }

    pub fn key(&self, tenant: &str, user: &str) -> UserKey {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(tenant.as_bytes());
        ctx.update(&[0]);
        ctx.update(user.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        UserKey(out)
    }
}

/// What a parsed inference request contributes to its decision.
pub struct Ask<'a> {
    pub kind: Kind,
    pub model: &'a str,
    pub prompt: String,
    /// The request's bound on generated tokens, if it names one.
    pub max_tokens: Option<u32>,
    /// The OpenAI `user` field, if sent.
    pub openai_user: Option<&'a str>,
}

/// Why a request did not get through the gate.
#[derive(Debug)]
pub enum Refused {
    /// No bundle in force (or it expired past its grace).
    NoPolicy(String),
    /// The request names a purpose or user the wrong way.
    BadRequest(String),
    Denied {
        deny: Deny,
        retry_after: Option<u64>,
    },
}

/// A reservation admission took, owned from the moment it is taken:
/// committed with the tokens used, or released — explicitly, or by being
/// dropped, however the request ends (the client gone during guard scoring,
/// while its decision is made durable, or mid-inference).
pub struct Reserved {
    admission: Arc<crate::usage::Usage>,
    ticket: Option<Ticket>,
}

impl Reserved {
    pub fn new(admission: Arc<crate::usage::Usage>, ticket: Ticket) -> Self {
        Self {
            admission,
            ticket: Some(ticket),
        }
    }

    /// What was reserved.
    pub fn ticket(&self) -> &Ticket {
        // Set at construction; taken only by the methods that consume self.
        self.ticket
            .as_ref()
            .unwrap_or_else(|| unreachable!("a Reserved holds its ticket"))
    }

    /// The request was served: count `tokens` instead of the estimate.
    pub fn commit(mut self, tokens: u64) {
        if let Some(ticket) = self.ticket.take() {
            self.admission.commit(ticket, tokens);
        }
    }

    /// Nothing was served: give back everything the reservation took.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.admission.release(ticket);
        }
    }
}

/// A request that may be served: its decision and the reservation taken for it.
pub struct Admitted {
    pub bundle: Arc<Active>,
    pub allow: Allow,
    pub reserved: Reserved,
    /// The bound on generated tokens the decision was made with.
    pub max_tokens: u32,
}

impl<'a> Ask<'a> {
    /// What an OpenAI request contributes: the one parse's fields and the
    /// text the model will be given.
    pub fn from_request(kind: Kind, request: &'a crate::openai::Request) -> Self {
        Self {
            kind,
            model: &request.model,
            prompt: request.policy_text(),
            max_tokens: request.max_tokens,
            openai_user: request.user.as_deref(),
        }
    }
}

/// A request that reached policy: the record to make durable, and what was decided.
pub struct Decided {
    pub record: DecisionRecord,
    pub outcome: Result<Admitted, Refused>,
    /// A denial past its principal's allowance of recorded denials
    /// (crate::denials): answered, counted, not written.
    pub unrecorded: bool,
}

/// Decides a request and, if allowed, takes its reservation. The bundle is
/// loaded once: the whole request is decided (and later audited) against it.
pub fn admit(
    shared: &Shared,
    conn: &Conn,
    request_id: &str,
    route: &str,
    headers: &HeaderMap,
    ask: &Ask<'_>,
) -> Result<Decided, Refused> {
    let config = shared.config();
    let bundle = shared
        .policy
        .in_force(config.policy.expiry_grace)
        .map_err(Refused::NoPolicy)?;
    let now = shared.policy.now();
    let b = &bundle.verified.bundle;

    // Caller-chosen strings are bounded before policy and the record see
    // them: an over-long one keeps a prefix and its length, and matches no
    // manifest id or purpose (crate::bounded).
    let purpose = match headers.get(PURPOSE_HEADER) {
        None => None,
        Some(v) => Some(clip(
            v.to_str()
                .map_err(|_| Refused::BadRequest(format!("{PURPOSE_HEADER} is not text")))?,
            MAX_NAME_BYTES,
        )),
    };
    let purpose = purpose.as_deref();
    let model_name = clip(ask.model, MAX_NAME_BYTES);
    let ask_model = model_name.as_ref();
    let tenant = b
        .tenant_map
        .resolve(&conn.identity)
        .ok()
        .and_then(|t| b.tenants.get(t));
    // A request that names no bound gets the default, within the tenant's limit.
    let max_tokens = ask.max_tokens.unwrap_or_else(|| {
        tenant
            .and_then(|t| t.limits.max_tokens_per_request)
            .map_or(DEFAULT_MAX_TOKENS, |m| m.min(DEFAULT_MAX_TOKENS))
    });
    // The end user, as the tenant's rule says to find it. An unknown
    // identity has no rule: decide() denies it before users matter.
    let raw_user = tenant
        .map(|tenant| match &tenant.user_identity {
            UserIdentity::OpenaiUser => Ok(ask.openai_user.map(str::to_owned)),
            UserIdentity::Header { name } => headers
                .get(name.as_str())
                .map(|v| {
                    v.to_str()
                        .map(str::to_owned)
                        .map_err(|_| format!("header {name} is not text"))
                })
                .transpose(),
            UserIdentity::Assertion { keys } => headers
                .get(ASSERTION_HEADER)
                .map(|v| {
                    let token = v
                        .to_str()
                        .map_err(|_| format!("{ASSERTION_HEADER} is not text"))?;
                    verify_user_assertion(token, keys, tenant.id.as_str(), now)
                        .map_err(|e| e.to_string())
                })
                .transpose(),
        })
        .transpose()
        .map_err(Refused::BadRequest)?
        .flatten()
        .filter(|u| !u.is_empty());
    if raw_user.as_ref().is_some_and(|u| u.len() > MAX_USER_BYTES) {
        return Err(Refused::BadRequest(format!(
            "end-user id is longer than {MAX_USER_BYTES} bytes"
        )));
    }
    let end_user = raw_user
        .as_deref()
        .zip(tenant)
        .map(|(u, t)| shared.users.key(t.id.as_str(), u));

    // A crude estimate until the engine's tokenizer counts: about four
    // characters per token, rounded up, holds for English text.
    let prompt_tokens = u32::try_from(ask.prompt.len().div_ceil(4)).unwrap_or(u32::MAX);
    let facts = RequestFacts {
        identity: &conn.identity,
        model: ask_model,
        kind: ask.kind,
        purpose,
        end_user,
        prompt: &ask.prompt,
        prompt_tokens,
        max_tokens,
    };
    shared.admission.observe(now);
    let decision = decide(b, shared.admission.as_ref(), &facts, now);
    // The record says what was decided, against which bundle, for whom.
    let model = b.models.get(ask_model);
    let mut identity = DecisionRecord::identity_value(&conn.identity);
    // A local user in thousands of groups, or a certificate with hundreds
    // of names: the record keeps a bounded prefix of what it was.
    let identity_text = identity.to_string();
    if identity_text.len() > MAX_IDENTITY_BYTES {
        identity = Value::String(clip(&identity_text, MAX_IDENTITY_BYTES).into_owned());
    }
    let mut record = DecisionRecord {
        request_id: request_id.to_owned(),
        identity,
        tenant: tenant.map(|t| t.id.to_string()),
        end_user: end_user.map(|u| crate::keys::hex(&u.0)),
        route: route.to_owned(),
        model: ask_model.to_owned(),
        model_files: model.map_or_else(Vec::new, |m| {
            m.files
                .iter()
                .map(|f| crate::keys::hex(&f.sha256))
                .collect()
        }),
        licences: model.map_or_else(Vec::new, |m| m.licence_chain.clone()),
        bundle_version: Some(bundle.version()),
        bundle_digest: Some(bundle.verified.digest.clone()),
        purpose: purpose
            .map(str::to_owned)
            .or_else(|| tenant.map(|t| t.default_purpose.clone())),
        decision: "deny".to_owned(),
        reason: String::new(),
        rule: String::new(),
        guard_score: None,
    };
    let allow = match decision {
        Decision::Deny(deny) => {
            count(shared, "deny", deny.reason.code());
            record.reason = deny.reason.code().to_owned();
            record.rule.clone_from(&deny.rule);
            // A transient denial says when to come back, from the same windows.
            let retry_after = tenant.and_then(|t| {
                shared
                    .admission
                    .retry_after(&t.id, deny.reason, &t.limits, now)
            });
            let unrecorded = crate::denials::before_limits(deny.reason)
                && !shared.denials.record(
                    &crate::denials::principal(&conn.identity),
                    tenant.is_some(),
                    std::time::Instant::now(),
                );
            return Ok(Decided {
                record,
                outcome: Err(Refused::Denied { deny, retry_after }),
                unrecorded,
            });
        }
        Decision::Allow(allow) => allow,
    };
    record.purpose = Some(allow.purpose.clone());
    match shared.admission.reserve(allow.reservation.clone(), now) {
        Ok(ticket) => {
            let reserved = Reserved::new(Arc::clone(&shared.admission), ticket);
            let ticket = reserved.ticket();
            // A guarded request is counted once its guard has spoken.
            if tenant.is_none_or(|t| t.content.guard.is_none()) {
                count(shared, "allow", "allowed");
            }
            record.decision = "allow".to_owned();
            record.reason = "allowed".to_owned();
            // A truncating budget may have granted less than asked.
            let granted = ticket
                .reservation
                .tokens
                .saturating_sub(ticket.reservation.prompt_tokens);
            let asked = max_tokens;
            let max_tokens = u32::try_from(granted).map_or(asked, |g| asked.min(g));
            if max_tokens < asked {
                record.rule = format!(
                    "max_tokens lowered to {max_tokens}: what is left of limits.tokens_per_day"
                );
            }
            Ok(Decided {
                record,
                outcome: Ok(Admitted {
                    bundle,
                    allow,
                    reserved,
                    max_tokens,
                }),
                unrecorded: false,
            })
        }
        Err(refusal) => {
            count(shared, "deny", refusal.reason.code());
            record.reason = refusal.reason.code().to_owned();
            record.rule.clone_from(&refusal.rule);
            Ok(Decided {
                record,
                outcome: Err(Refused::Denied {
                    deny: Deny {
                        reason: refusal.reason,
                        rule: refusal.rule,
                        tenant: Some(allow.tenant),
                    },
                    retry_after: refusal.retry_after,
                }),
                unrecorded: false,
            })
        }
    }
}

fn count(shared: &Shared, decision: &'static str, reason: &'static str) {
    shared
        .metrics
        .decisions
        .get_or_create(&DecisionLabels { decision, reason })
        .inc();
}

/// The tenant's guard model, if its content rules name one: after policy
/// allowed and before the decision record is made durable, the prompt is
/// scored. At or over the threshold the request is denied
/// (`guard_denied`); a guard that is not loaded, overloaded, failing or not
/// done within its timeout denies too (`guard_unavailable`, fail closed).
/// The guard's own use is decided like any model's: the tenant's, for the
/// guard's purpose. The score goes into the one decision record either way.
pub async fn guard(
    shared: &Shared,
    identity: &Identity,
    mut decided: Decided,
    prompt: &str,
) -> Decided {
    let Ok(admitted) = &decided.outcome else {
        return decided;
    };
    let bundle = Arc::clone(&admitted.bundle);
    let b = &bundle.verified.bundle;
    let Some(g) = b
        .tenants
        .get(&admitted.allow.tenant)
        .and_then(|t| t.content.guard.clone())
    else {
        return decided;
    };
    let now = shared.policy.now();
    let facts = RequestFacts {
        identity,
        model: &g.model,
        kind: Kind::Classifier,
        purpose: Some(&g.purpose),
        end_user: admitted.allow.reservation.user,
        prompt,
        prompt_tokens: 0,
        max_tokens: 1,
    };
    // The guard's use is decided for the tenant, the manifest, the purpose
    // and the licence; not for limits: the request's own reservation holds
    // them already, and deciding them again would count it against itself.
    let verdict: Result<f32, (Reason, String)> = match decide_use(b, &facts, now) {
        Err(d) => Err((
            d.reason,
            format!("guard model {:?} may not be used: {}", g.model, d.rule),
        )),
        Ok(()) => match shared.models.get_onnx(&g.model) {
            None => Err((
                Reason::GuardUnavailable,
                format!("guard model {:?} is not loaded", g.model),
            )),
            Some(model) => {
                let started = std::time::Instant::now();
                let delay = shared.failpoints.guard_delay.unwrap_or_default();
                let scored =
                    tokio::time::timeout(std::time::Duration::from_millis(g.timeout_ms), async {
                        tokio::time::sleep(delay).await;
                        model.classify(prompt.to_owned()).await
                    })
                    .await;
                shared
                    .metrics
                    .guard_latency
                    .get_or_create(&crate::metrics::ModelLabels {
                        model: g.model.clone(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                let index = b
                    .models
                    .get(&g.model)
                    .and_then(|m| m.labels.iter().position(|l| *l == g.label));
                match (scored, index) {
                    (Err(_), _) => Err((
                        Reason::GuardUnavailable,
                        format!(
                            "guard model {:?} did not answer within {} ms",
                            g.model, g.timeout_ms
                        ),
                    )),
                    (Ok(Err(e)), _) => Err((
                        Reason::GuardUnavailable,
                        format!("guard model {:?} failed: {e}", g.model),
                    )),
                    (Ok(Ok(probs)), Some(i)) if i < probs.len() => Ok(probs[i]),
                    (Ok(Ok(probs)), _) => Err((
                        Reason::GuardUnavailable,
                        format!(
                            "guard model {:?} gave {} scores; label {:?} has none",
                            g.model,
                            probs.len(),
                            g.label
                        ),
                    )),
                }
            }
        },
    };
    let denial = match verdict {
        Ok(score) => {
            decided.record.guard_score = Some(score);
            if f64::from(score) < g.threshold {
                count(shared, "allow", "allowed");
                return decided;
            }
            (
                Reason::GuardDenied,
                format!(
                    "guard {:?}: {:?} scored {score:.3}, the threshold is {}",
                    g.model, g.label, g.threshold
                ),
            )
        }
        Err(d) => d,
    };
    let (reason, rule) = denial;
    let Ok(admitted) =
        std::mem::replace(&mut decided.outcome, Err(Refused::NoPolicy(String::new())))
    else {
        unreachable!("checked above");
    };
    admitted.reserved.release();
    count(shared, "deny", reason.code());
    decided.record.decision = "deny".to_owned();
    decided.record.reason = reason.code().to_owned();
    decided.record.rule.clone_from(&rule);
    decided.outcome = Err(Refused::Denied {
        deny: Deny {
            reason,
            rule,
            tenant: Some(admitted.allow.tenant),
        },
        retry_after: (reason == Reason::GuardUnavailable).then_some(1),
    });
    decided
}
