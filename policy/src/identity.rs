//! Transport identities and their mapping to tenants.
//!
//! The daemon reads an [`Identity`] from the transport (SO_PEERCRED and
//! SO_PEERGROUPS on the Unix socket; the verified client certificate on
//! mutual TLS) and asks a [`TenantMap`] which tenant it belongs to. Until signed
//! bundles carry the tenants, the map is built from the static table in the
//! daemon's configuration.

use std::fmt;

use serde::Serialize;

/// Who is on the other end of a connection, as the transport proved it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum Identity {
    /// A peer on a Unix-domain socket; the kernel vouches for these values.
    Unix(UnixPeer),
    /// A peer on mutual TLS; the client CA vouches for these values.
    Tls(TlsPeer),
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsPeer {
    /// The URI SAN (e.g. a SPIFFE ID): the primary identity. Certificates
    /// with more than one are refused at the handshake.
    pub uri: Option<String>,
    /// DNS SANs; used for tenant mapping only when the configuration says so.
    pub dns_names: Vec<String>,
    /// The subject CN; used for tenant mapping only when the configuration says so.
    pub common_name: Option<String>,
    /// Certificate serial, lower-case hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub sha256: String,
    /// The certificate's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The TCP peer address, for logs.
    pub remote_addr: String,
}

/// Credentials of a Unix-socket peer, taken when it connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
    /// Absent when the kernel could not name the process (e.g. another pid namespace).
    pub pid: Option<i32>,
    /// Supplementary groups (SO_PEERGROUPS), sorted and without duplicates.
    pub groups: Vec<u32>,
}

impl UnixPeer {
    /// Builds a peer, normalising the supplementary groups.
    pub fn new(uid: u32, gid: u32, pid: Option<i32>, mut groups: Vec<u32>) -> Self {
        groups.sort_unstable();
        groups.dedup();
        Self {
            uid,
            gid,
            pid,
            groups,
        }
    }

    /// Whether the peer is in `gid`, as its primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.binary_search(&gid).is_ok()
    }
}

/// A tenant's name as the policy knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// Tenant names are short, printable and safe in logs, metrics labels and file names.
    pub fn parse(name: &str) -> Result<Self, InvalidTenantId> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && name.as_bytes()[0].is_ascii_alphanumeric();
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidTenantId(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid tenant name {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
)]
pub struct InvalidTenantId(pub String);

/// A rule that places a peer in a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    /// A Unix peer's uid.
    Uid(u32),
    /// A Unix peer's primary or any supplementary group.
    Gid(u32),
    /// A TLS client certificate's URI SAN, compared exactly.
    Uri(String),
    /// A TLS client certificate's DNS SAN, compared ASCII case-insensitively.
    DnsName(String),
    /// A TLS client certificate's subject CN, compared exactly.
    CommonName(String),
}

/// Which weaker certificate names may place a TLS peer in a tenant. The URI
/// SAN always may; DNS SANs and the CN only when an operator opts in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsNameRules {
    pub dns_names: bool,
    pub common_name: bool,
}

/// Why an identity could not be placed in exactly one tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantLookupError {
    #[error("identity matches no tenant")]
    NoTenant,
    #[error("identity matches more than one tenant at the same precedence: {}", names(.0))]
    Ambiguous(Vec<TenantId>),
}

fn names(tenants: &[TenantId]) -> String {
    tenants
        .iter()
        .map(TenantId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Maps transport identities to tenants.
///
/// A uid rule is more specific than a group rule, so it wins; two tenants
/// matching at the same precedence is an ambiguity and is refused rather than
/// guessed (a caller must never land in a tenant by the order of a table).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantMap {
    tenants: Vec<(TenantId, Vec<Principal>)>,
    tls_names: TlsNameRules,
}

impl TenantMap {
    pub fn new(tenants: Vec<(TenantId, Vec<Principal>)>) -> Self {
        Self {
            tenants,
            tls_names: TlsNameRules::default(),
        }
    }

    /// Allows DNS SANs and/or the CN to map TLS peers (after the URI SAN).
    pub fn with_tls_names(mut self, rules: TlsNameRules) -> Self {
        self.tls_names = rules;
        self
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn resolve(&self, identity: &Identity) -> Result<&TenantId, TenantLookupError> {
        // The strongest precedence level with any match decides. One pass,
        // no allocation unless the answer is an ambiguity.
        let strongest =
            |rules: &[Principal]| rules.iter().filter_map(|r| self.level(identity, r)).min();
        let mut best: Option<(u8, &TenantId)> = None;
        let mut ambiguous = false;
        for (id, rules) in &self.tenants {
            let Some(level) = strongest(rules) else {
                continue;
            };
            match best {
                Some((b, _)) if level > b => {}
                Some((b, _)) if level == b => ambiguous = true,
                _ => {
                    best = Some((level, id));
                    ambiguous = false;
                }
            }
        }
        match best {
            None => Err(TenantLookupError::NoTenant),
            Some((_, id)) if !ambiguous => Ok(id),
            Some((level, _)) => Err(TenantLookupError::Ambiguous(
                self.tenants
                    .iter()
                    .filter(|(_, rules)| strongest(rules) == Some(level))
                    .map(|(id, _)| id.clone())
                    .collect(),
            )),
        }
    }

    /// The precedence at which `rule` matches `identity` (0 is strongest), if it does.
    fn level(&self, identity: &Identity, rule: &Principal) -> Option<u8> {
        match (identity, rule) {
            (Identity::Unix(p), Principal::Uid(uid)) if p.uid == *uid => Some(0),
            (Identity::Unix(p), Principal::Gid(gid)) if p.in_group(*gid) => Some(1),
            (Identity::Tls(p), Principal::Uri(uri)) if p.uri.as_deref() == Some(uri) => Some(0),
            (Identity::Tls(p), Principal::DnsName(name))
                if self.tls_names.dns_names
                    && p.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name)) =>
            {
                Some(1)
            }
            (Identity::Tls(p), Principal::CommonName(cn))
                if self.tls_names.common_name && p.common_name.as_deref() == Some(cn) =>
            {
                Some(2)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
