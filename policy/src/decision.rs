//! The decision function: may this request be served, and on what terms?
//!
//! `decide` is pure and deterministic: the active bundle, a read-only view
//! of usage, the request's facts and the time go in; a [`Decision`] comes
//! out carrying everything the audit record needs. It does not reserve
//! anything: an allow says what must be reserved, and the daemon's admission
//! step takes that reservation atomically (so a cap of 50 admits exactly 50).

use serde::Serialize;

use crate::bundle::{Bundle, Kind, OverBudget, OverCap, ReviewAction, UserIdentity};
use crate::identity::{Identity, TenantId, TenantLookupError};
use crate::time::UnixTime;

/// An end user as the daemon keyed-hashed them (HMAC): opaque to policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct UserKey(pub [u8; 32]);

/// What a request is, as the daemon parsed and validated it.
#[derive(Clone, Debug)]
pub struct RequestFacts<'a> {
    pub identity: &'a Identity,
    pub model: &'a str,
    pub kind: Kind,
    /// The `airgate-purpose` header, if sent; else the tenant's default.
    pub purpose: Option<&'a str>,
    pub end_user: Option<UserKey>,
    /// The text content rules are checked against.
    pub prompt: &'a str,
    pub prompt_tokens: u32,
    /// The most tokens the request may generate (its max_tokens, or the daemon's default).
    pub max_tokens: u32,
}

/// Usage as of now, per tenant and per licence; the daemon's usage store implements it.
pub trait UsageView {
    fn requests_last_minute(&self, tenant: &TenantId) -> u32;
    fn tokens_today(&self, tenant: &TenantId) -> u64;
    fn concurrent(&self, tenant: &TenantId) -> u32;
    /// Distinct users of the tenant this calendar month (UTC).
    fn tenant_users(&self, tenant: &TenantId) -> u64;
    fn tenant_user_seen(&self, tenant: &TenantId, user: &UserKey) -> bool;
    /// Distinct users under the licence this month, across every tenant and model.
    fn licence_users(&self, licence: &str) -> u64;
    fn licence_user_seen(&self, licence: &str, user: &UserKey) -> bool;
}

/// Why a request is denied. The `code` strings are stable: they are in audit
/// records, metrics and the README's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownIdentity,
    AmbiguousIdentity,
    ModelNotInManifest,
    ModelNotAllowed,
    ModelKindMismatch,
    PurposeNotDeclared,
    LicenceReviewOverdue,
    UserRequired,
    PromptTooLong,
    ContentRule,
    MaxTokensExceeded,
    RateLimited,
    TokenBudgetExhausted,
    ConcurrencyLimit,
    TenantUserCap,
    LicenceUserThreshold,
    GuardDenied,
    GuardUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Self::UnknownIdentity,
        Self::AmbiguousIdentity,
        Self::ModelNotInManifest,
        Self::ModelNotAllowed,
        Self::ModelKindMismatch,
        Self::PurposeNotDeclared,
        Self::LicenceReviewOverdue,
        Self::UserRequired,
        Self::PromptTooLong,
        Self::ContentRule,
        Self::MaxTokensExceeded,
        Self::RateLimited,
        Self::TokenBudgetExhausted,
        Self::ConcurrencyLimit,
        Self::TenantUserCap,
        Self::LicenceUserThreshold,
        Self::GuardDenied,
        Self::GuardUnavailable,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::UnknownIdentity => "unknown_identity",
            Self::AmbiguousIdentity => "ambiguous_identity",
            Self::ModelNotInManifest => "model_not_in_manifest",
            Self::ModelNotAllowed => "model_not_allowed",
            Self::ModelKindMismatch => "model_kind_mismatch",
            Self::PurposeNotDeclared => "purpose_not_declared",
            Self::LicenceReviewOverdue => "licence_review_overdue",
            Self::UserRequired => "user_required",
            Self::PromptTooLong => "prompt_too_long",
            Self::ContentRule => "content_rule",
            Self::MaxTokensExceeded => "max_tokens_exceeded",
            Self::RateLimited => "rate_limited",
            Self::TokenBudgetExhausted => "token_budget_exhausted",
            Self::ConcurrencyLimit => "concurrency_limit",
            Self::TenantUserCap => "tenant_user_cap",
            Self::LicenceUserThreshold => "licence_user_threshold",
            Self::GuardDenied => "guard_denied",
            Self::GuardUnavailable => "guard_unavailable",
        }
    }

    /// Whether the caller may retry later (HTTP 429) rather than never (403).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::TokenBudgetExhausted | Self::ConcurrencyLimit
        )
    }
}

/// A denial: the reason and the rule that fired, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deny {
    pub reason: Reason,
    pub rule: String,
    pub tenant: Option<TenantId>,
}

/// Something the daemon must do when serving an allowed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Obligation {
    /// Show this attribution notice with the response.
    Attribution { licence: String, text: String },
    /// The licence's review date has passed; serving is allowed but flagged.
    ReviewOverdue { licence: String },
    /// This end user is new this month for the tenant.
    NewTenantUser,
    /// The tenant's user cap is reached and its rule is allow-and-flag.
    TenantCapExceeded,
}

/// What the admission step must take atomically before the request is served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub tenant: TenantId,
    pub user: Option<UserKey>,
    /// Tokens to hold against the daily budget until the actual count is
    /// known: the prompt's estimate plus max_tokens. A taken ticket's
    /// reservation holds what was granted (less, when truncated).
    pub tokens: u64,
    /// The prompt's share of `tokens`.
    pub prompt_tokens: u64,
    /// Grant what is left of the budget when `tokens` would overrun it, as
    /// long as the prompt and one generated token fit.
    pub truncate: bool,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub concurrent_requests: Option<u32>,
    /// The tenant's user cap, when new users are refused past it.
    pub tenant_user_cap: Option<u64>,
    /// The tenant's user cap whatever its over-cap rule (for warnings).
    pub tenant_user_limit: Option<u64>,
    /// Licence thresholds that bind this request: (licence, threshold).
    pub licence_user_thresholds: Vec<(String, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Allow {
    pub tenant: TenantId,
    pub purpose: String,
    pub model: String,
    /// The model's licence and every ancestor's.
    pub licences: Vec<String>,
    pub obligations: Vec<Obligation>,
    pub reservation: Reservation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "one decision per request, moved once into the audit path: a 264-byte move beats an allocation on the hot path"
)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

fn deny(reason: Reason, rule: impl Into<String>, tenant: Option<&TenantId>) -> Decision {
    Decision::Deny(Deny {
        reason,
        rule: rule.into(),
        tenant: tenant.cloned(),
    })
}

/// What a request may use, before any limit: its tenant, the model, the
/// purpose, and the licence obligations that come with the model.
struct Use<'b> {
    tenant_id: &'b TenantId,
    tenant: &'b crate::bundle::Tenant,
    model: &'b crate::bundle::Model,
    purpose: &'b str,
    obligations: Vec<Obligation>,
}

/// Identity, manifest, the tenant's models, the model's kinds, the purpose
/// and the licences' review dates: whether the request may use the model at
/// all, whatever it costs.
fn check_use<'b>(
    bundle: &'b Bundle,
    facts: &RequestFacts<'b>,
    now: UnixTime,
) -> Result<Use<'b>, Deny> {
    let deny = |reason, rule: String, tenant: Option<&TenantId>| Deny {
        reason,
        rule,
        tenant: tenant.cloned(),
    };
    let tenant_id = match bundle.tenant_map.resolve(facts.identity) {
        Ok(t) => t,
        Err(TenantLookupError::NoTenant) => {
            return Err(deny(
                Reason::UnknownIdentity,
                "identity matches no tenant of the bundle".to_owned(),
                None,
            ));
        }
        Err(e @ TenantLookupError::Ambiguous(_)) => {
            return Err(deny(Reason::AmbiguousIdentity, e.to_string(), None));
        }
    };
    let Some(tenant) = bundle.tenants.get(tenant_id) else {
        return Err(deny(
            Reason::UnknownIdentity,
            "tenant of the identity map is missing".to_owned(),
            None,
        ));
    };
    let t = Some(tenant_id);

    let Some(model) = bundle.models.get(facts.model) else {
        return Err(deny(
            Reason::ModelNotInManifest,
            format!("model {:?} is not in the manifest", facts.model),
            t,
        ));
    };
    if !tenant.models.contains(facts.model) {
        return Err(deny(
            Reason::ModelNotAllowed,
            format!("tenant {tenant_id} may not use model {:?}", facts.model),
            t,
        ));
    }
    if !model.kinds.contains(&facts.kind) {
        return Err(deny(
            Reason::ModelKindMismatch,
            format!(
                "model {:?} does not serve {:?} requests",
                facts.model, facts.kind
            ),
            t,
        ));
    }
    let purpose = facts.purpose.unwrap_or(&tenant.default_purpose);
    if !tenant.purposes.contains(purpose) {
        return Err(deny(
            Reason::PurposeNotDeclared,
            format!("purpose {purpose:?} is not declared by tenant {tenant_id}"),
            t,
        ));
    }

    let mut obligations = Vec::new();
    let today = now.date();
    for id in &model.licence_chain {
        let licence = &bundle.licences[id];
        if today > licence.review_by {
            match licence.after_review {
                ReviewAction::Refuse => {
                    return Err(deny(
                        Reason::LicenceReviewOverdue,
                        format!("licence {id} was due for review by {}", licence.review_by),
                        t,
                    ));
                }
                ReviewAction::Flag => obligations.push(Obligation::ReviewOverdue {
                    licence: id.clone(),
                }),
            }
        }
        if let Some(text) = &licence.attribution {
            obligations.push(Obligation::Attribution {
                licence: id.clone(),
                text: text.clone(),
            });
        }
    }
    Ok(Use {
        tenant_id,
        tenant,
        model,
        purpose,
        obligations,
    })
}

/// Whether a request may use a model at all — tenant, manifest, kinds,
/// purpose, licence review — with no limit, cap or content rule applied.
/// For a model a request uses on the side of another (a guard), whose
/// limits the request's own reservation already holds: deciding it with
/// [`decide`] would count the request against itself.
pub fn decide_use(bundle: &Bundle, facts: &RequestFacts<'_>, now: UnixTime) -> Result<(), Deny> {
    check_use(bundle, facts, now).map(drop)
}

/// Decides a request against the active bundle. See the module docs.
pub fn decide(
    bundle: &Bundle,
    usage: &dyn UsageView,
    facts: &RequestFacts<'_>,
    now: UnixTime,
) -> Decision {
    let Use {
        tenant_id,
        tenant,
        model,
        purpose,
        mut obligations,
    } = match check_use(bundle, facts, now) {
        Ok(u) => u,
        Err(d) => return Decision::Deny(d),
    };
    let t = Some(tenant_id);

    let needs_user = tenant.user_cap.is_some()
        || !matches!(tenant.user_identity, UserIdentity::OpenaiUser)
        || model
            .licence_chain
            .iter()
            .any(|l| bundle.licences[l].monthly_active_user_threshold.is_some());
    if needs_user && facts.end_user.is_none() {
        return deny(Reason::UserRequired, "requests must name their end user", t);
    }

    if let Some(max) = tenant.content.max_prompt_chars {
        let chars = facts.prompt.chars().count();
        if chars > max as usize {
            return deny(
                Reason::PromptTooLong,
                format!("prompt is {chars} characters; the limit is {max}"),
                t,
            );
        }
    }
    let content = &tenant.content;
    // Rules see the prompt as sent and in its folded form (crate::content):
    // an evasive spelling of a literal or of what a pattern matches is caught.
    let folded = (!content.deny_literals.is_empty() || !content.deny_regex.is_empty())
        .then(|| crate::content::fold(facts.prompt));
    if let Some(folded) = &folded
        && let Some(lit) = content
            .deny_literals
            .iter()
            .find(|l| folded.contains(l.as_str()))
    {
        return deny(Reason::ContentRule, format!("deny_literal {lit:?}"), t);
    }
    let rules = &content.deny_regex;
    let matched = if rules.is_match(facts.prompt) {
        Some(facts.prompt)
    } else {
        folded.as_deref().filter(|f| rules.is_match(f))
    };
    if let Some(text) = matched {
        // Which pattern, only for a prompt that is denied: the first that
        // matches, in the bundle's order.
        let pattern = rules
            .matches(text)
            .iter()
            .next()
            .and_then(|i| rules.patterns().get(i))
            .map_or("", String::as_str);
        return deny(Reason::ContentRule, format!("deny_regex {pattern:?}"), t);
    }

    let limits = &tenant.limits;
    if let Some(max) = limits.max_tokens_per_request
        && facts.max_tokens > max
    {
        return deny(
            Reason::MaxTokensExceeded,
            format!("max_tokens {} exceeds the tenant's {max}", facts.max_tokens),
            t,
        );
    }
    if let Some(rpm) = limits.requests_per_minute
        && usage.requests_last_minute(tenant_id) >= rpm
    {
        return deny(
            Reason::RateLimited,
            format!("limits.requests_per_minute = {rpm}"),
            t,
        );
    }
    let prompt_tokens = u64::from(facts.prompt_tokens);
    let tokens = prompt_tokens + u64::from(facts.max_tokens);
    // Truncating still needs room for the prompt and one generated token.
    let needed = match limits.over_budget {
        OverBudget::Refuse => tokens,
        OverBudget::Truncate => prompt_tokens + 1,
    };
    if let Some(budget) = limits.tokens_per_day
        && usage.tokens_today(tenant_id).saturating_add(needed) > budget
    {
        return deny(
            Reason::TokenBudgetExhausted,
            format!("limits.tokens_per_day = {budget}"),
            t,
        );
    }
    if let Some(max) = limits.concurrent_requests
        && usage.concurrent(tenant_id) >= max
    {
        return deny(
            Reason::ConcurrencyLimit,
            format!("limits.concurrent_requests = {max}"),
            t,
        );
    }

    let mut tenant_user_cap = None;
    let tenant_user_limit = tenant
        .user_cap
        .as_ref()
        .map(crate::bundle::UserCap::host_cap);
    let mut licence_user_thresholds = Vec::new();
    if let Some(user) = &facts.end_user {
        let new_for_tenant = !usage.tenant_user_seen(tenant_id, user);
        if new_for_tenant {
            obligations.push(Obligation::NewTenantUser);
        }
        if let Some(cap) = &tenant.user_cap {
            let host_cap = cap.host_cap();
            if new_for_tenant && usage.tenant_users(tenant_id) >= host_cap {
                match cap.over_cap {
                    OverCap::RefuseNewUsers => {
                        return deny(Reason::TenantUserCap, cap_rule(cap), t);
                    }
                    OverCap::AllowAndFlag => obligations.push(Obligation::TenantCapExceeded),
                }
            }
            if cap.over_cap == OverCap::RefuseNewUsers {
                tenant_user_cap = Some(host_cap);
            }
        }
        for id in &model.licence_chain {
            if let Some(threshold) = bundle.licences[id].monthly_active_user_threshold {
                if !usage.licence_user_seen(id, user) && usage.licence_users(id) >= threshold {
                    return deny(
                        Reason::LicenceUserThreshold,
                        format!("licence {id}: monthly_active_user_threshold = {threshold}"),
                        t,
                    );
                }
                licence_user_thresholds.push((id.clone(), threshold));
            }
        }
    }

    Decision::Allow(Allow {
        tenant: tenant_id.clone(),
        purpose: purpose.to_owned(),
        model: model.id.clone(),
        licences: model.licence_chain.clone(),
        obligations,
        reservation: Reservation {
            tenant: tenant_id.clone(),
            user: facts.end_user,
            tokens,
            prompt_tokens,
            truncate: limits.over_budget == OverBudget::Truncate,
            requests_per_minute: limits.requests_per_minute,
            tokens_per_day: limits.tokens_per_day,
            concurrent_requests: limits.concurrent_requests,
            tenant_user_cap,
            tenant_user_limit,
            licence_user_thresholds,
        },
    })
}

/// The rule a tenant cap denial names: the cap, and the fleet's when it is a share.
pub fn cap_rule(cap: &crate::bundle::UserCap) -> String {
    match cap.host_share {
        Some(share) => format!(
            "user_cap: this host's share {share} of the fleet's max_users_per_month = {} is {}",
            cap.max_users_per_month,
            cap.host_cap()
        ),
        None => format!("user_cap.max_users_per_month = {}", cap.max_users_per_month),
    }
}

#[cfg(test)]
mod tests;
