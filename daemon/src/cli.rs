//! The command line. Kept apart from `main.rs` so the man page and shell
//! completions (the packaging issue) can be generated from the same definition.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const DEFAULT_CONFIG: &str = "/etc/airgate/airgate.toml";

#[derive(Debug, Parser)]
#[command(
    name = "airgate",
    version,
    about = "Licence-enforcing inference daemon for air-gapped hosts",
    long_about = "airgate serves local open-weight models over a Unix socket (and, later, mutual TLS), \
                  decides every request against signed per-tenant policy and keeps a tamper-evident audit log."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// Start even though the audit chain does not verify. The break stays
        /// in the log (verify keeps reporting it) and the override is
        /// recorded as an audit record. For recovery after an investigation.
        #[arg(long)]
        accept_broken_audit: bool,
    },
    /// Validate a configuration file and report every problem; exit 64 if any.
    CheckConfig {
        /// Configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running daemon's status (operators only).
    Status {
        /// The daemon's Unix socket; defaults to the one in the configuration.
        #[arg(long, short)]
        socket: Option<PathBuf>,
        /// Configuration file to take the socket path from.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Distinct users, requests and tokens per tenant and licence against
    /// their limits, from the running daemon (operators only).
    Usage {
        #[command(subcommand)]
        command: Option<UsageCommand>,
        /// The month to show (YYYY-MM, UTC); the current one by default.
        #[arg(long)]
        month: Option<String>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG", global = true)]
        config: PathBuf,
        /// The daemon's Unix socket; defaults to the one in the configuration.
        #[arg(long, short, global = true)]
        socket: Option<PathBuf>,
    },
    /// An AI bill of materials for the models of the bundle in force:
    /// CycloneDX 1.6 JSON (ML-BOM) with their digests, licences and provenance.
    Sbom {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// Write here instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// The compliance report of a month: per model its licences, tenants,
    /// requests, tokens and distinct users against thresholds and caps;
    /// refusals by reason; bundles in force; review dates and attribution;
    /// and the audit chain's verification. From the running daemon (admin
    /// socket), a stopped store or snapshot (--state), or evidence packs
    /// of one or more hosts (--pack, repeatable: users counted once).
    Report {
        /// The month (YYYY-MM, UTC; or `last`, `this`).
        #[arg(long)]
        month: String,
        #[arg(long, value_enum, default_value = "html")]
        format: crate::report::Format,
        /// Where to write the report (`-` for standard output).
        #[arg(long, short)]
        out: PathBuf,
        /// Read this state directory directly (a stopped daemon's, or a snapshot).
        #[arg(long, conflicts_with = "pack")]
        state: Option<PathBuf>,
        /// An evidence pack (directory or .tar), verified first; repeat for
        /// the hosts of a fleet that share the user-hashing secret.
        #[arg(long)]
        pack: Vec<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
    },
    /// The evidence pack of a month: the audit records (verifiable against
    /// the signed checkpoints), the bundles in force, the model manifest,
    /// the report, and a manifest of digests signed by the host key.
    Evidence {
        #[command(subcommand)]
        command: Option<EvidenceCommand>,
        /// The month (YYYY-MM, UTC; or `last`, `this`).
        #[arg(long)]
        month: Option<String>,
        /// A new directory, or a file ending in .tar.
        #[arg(long, short, conflicts_with = "into")]
        out: Option<PathBuf>,
        /// Write DIR/airgate-evidence-YYYY-MM.tar, unless that pack exists
        /// already (then nothing is written and the exit status is 0): what
        /// the monthly timer runs.
        #[arg(long, value_name = "DIR")]
        into: Option<PathBuf>,
        /// Read this state directory directly (a stopped daemon's).
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
    },
    /// Man pages and shell completions from this command line's definition
    /// (used to build the package).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        command: GenerateCommand,
    },
    /// Work with model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Make an Ed25519 key pair for signing bundles: DIR/NAME.key (PKCS#8,
    /// mode 0600, never overwritten) and DIR/NAME.pub (give it to hosts as a
    /// trust anchor with key_id NAME).
    Keygen {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The key id: the file names and the `kid` of bundles signed with it.
        #[arg(long)]
        name: String,
    },
    /// The audit log of a stopped daemon (or a copy of its state directory).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Policy bundles: sign, verify, inspect, compare.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// A small certificate authority for the mTLS listener.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key 0600) and an empty CRL in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "airgate CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a server certificate (OUT.pem, OUT.key) for the host's names and addresses.
    Server {
        #[arg(long)]
        dir: PathBuf,
        /// Output prefix: writes OUT.pem and OUT.key.
        #[arg(long)]
        out: PathBuf,
        /// A DNS name of the host (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address of the host (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, default_value_t = 397)]
        days: i64,
    },
    /// Issue a client certificate whose URI SAN names the tenant identity.
    Client {
        #[arg(long)]
        dir: PathBuf,
        /// Output prefix: writes OUT.pem and OUT.key.
        #[arg(long)]
        out: PathBuf,
        /// The identity, e.g. spiffe://corp.example/tenant/claims.
        #[arg(long)]
        uri: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Revoke a certificate issued by the CA and re-issue the CRL.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to revoke (PEM).
        cert: PathBuf,
        /// Validity of the re-issued CRL.
        #[arg(long, default_value_t = 30)]
        crl_days: i64,
    },
    /// Re-issue the CRL (moves its nextUpdate forward).
    Crl {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the whole chain; exit 76 naming the first bad record.
    Verify {
        /// The state directory; defaults to the configuration's.
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// Checkpoints kept elsewhere: lines `SEQ HASH` (e.g. from the journal).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// Verify from this record on (taking the hash it links to as given),
        /// e.g. the last sequence an earlier verification reached.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Records as JSON Lines: from the running daemon (admin socket), or
    /// read directly from a stopped store or snapshot with --state.
    Export {
        /// Read this state directory directly (a stopped daemon's, or a snapshot).
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// First sequence number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Only records written at or after this time: RFC 3339
        /// (2026-11-23T00:00:00Z) or Unix seconds.
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Only decision and completion records of this tenant's requests.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Follow new records of the running daemon (operators; Ctrl-C to stop).
    Tail {
        /// Start here instead of the last 10 records.
        #[arg(long)]
        from: Option<u64>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Ask the running daemon for a consistent copy of its audit store
    /// (written under STATE/snapshots/); verify or export it with --state.
    Snapshot {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The keyed hash an end user's records carry, to search for them.
    HashUser {
        tenant: String,
        user: String,
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Check a pack without the daemon: the signed manifest, every file's
    /// digest (naming any modified, added or missing), the audit records
    /// and their checkpoints, the bundles' signatures, and the report
    /// against the records. Exit 65 if anything fails.
    Verify {
        /// The pack: a directory or a .tar file.
        pack: PathBuf,
        /// The host's public key as known to you (PEM); otherwise the pack's
        /// own host.pub is used and its fingerprint printed to compare.
        #[arg(long)]
        host_key: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Recompute the counters from the audit log (the record of truth) and
    /// report what differed; recorded in the audit log.
    Rebuild,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Sign a policy (TOML or JSON) into a bundle in one step. iat, nbf and
    /// exp are filled in from --valid-for when the policy leaves them out.
    Sign {
        /// The private key (PKCS#8 PEM, Ed25519 or P-256).
        #[arg(long)]
        key: PathBuf,
        /// The key id; defaults to the key file's name without extension.
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long, default_value = "30d")]
        valid_for: String,
        policy: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Write the signing input for a key held elsewhere (offline machine,
    /// hardware token); sign its bytes there and join with `bundle attach`.
    Prepare {
        #[arg(long)]
        key_id: String,
        /// eddsa (Ed25519) or es256 (P-256).
        #[arg(long, default_value = "eddsa")]
        alg: String,
        #[arg(long, default_value = "30d")]
        valid_for: String,
        policy: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Join a signing input and its signature (raw bytes, base64, or DER for
    /// ES256) into a bundle, checking it against the public key first.
    Attach {
        input: PathBuf,
        signature: PathBuf,
        /// The signer's public key (PEM): the bundle is written only if it verifies.
        #[arg(long = "pub")]
        public_key: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Run the daemon's checks on a bundle and report; exit 65 if refused.
    Verify {
        /// A directory of trust anchors, KEYID.pub each.
        #[arg(long, conflicts_with = "config")]
        trust: Option<PathBuf>,
        /// Or take trust anchors and audience from a configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The host's audience; defaults to the configuration's, else the bundle's own.
        #[arg(long)]
        audience: Option<String>,
        bundle: PathBuf,
    },
    /// Show a bundle's contents (signature NOT checked: use verify).
    Inspect {
        bundle: PathBuf,
        /// Print the claims as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What changes from OLD to NEW, for which tenant.
    Diff { old: PathBuf, new: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// roff man pages: airgate.1 and one per subcommand (airgate-audit.1, ...).
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Shell completions for bash, zsh and fish.
    Completions {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Load a GGUF (llama.cpp) or ONNX (tract) file and describe it.
    Inspect {
        /// The model file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy model files (e.g. from removable media) into models_dir, each
    /// checked by sha256 against the manifest of the bundle in force and
    /// written under the manifest's file name, owned by root, not writable
    /// by others. Files the manifest does not name are refused (exit 65).
    Import {
        /// Files, or directories whose files are imported.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
    },
}

/// `--since`: RFC 3339 or Unix seconds.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(seconds) = s.parse::<i64>() {
        return Ok(seconds);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(time::OffsetDateTime::unix_timestamp)
        .map_err(|e| {
            format!("{s:?} is neither RFC 3339 (2026-11-23T00:00:00Z) nor Unix seconds: {e}")
        })
}
