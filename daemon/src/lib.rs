//! airgate: the daemon and its operator commands.
//!
//! `main.rs` only parses the command line and calls [`run_cli`]. The server
//! itself is [`server::Daemon::run`], which takes its listeners and a
//! shutdown future from the caller. Policy decisions live in the
//! `airgate-policy` crate; this crate does every I/O and hands it facts.

pub mod api;
pub mod audit;
pub mod authority;
pub mod body;
pub mod bounded;
pub mod bundle;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod connection;
pub mod denials;
pub mod evidence;
pub mod exit;
pub mod failpoint;
pub mod gate;
pub mod heartbeat;
pub mod keys;
pub mod kserve;
pub mod listener;
pub mod llm;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod onnx;
pub mod openai;
pub mod pki;
pub mod report;
pub mod request_id;
pub mod sbom;
pub mod server;
mod sys;
pub mod systemd;
pub mod tls;
pub mod usage;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cli::{
    AuditCommand, BundleCommand, Cli, Command, GenerateCommand, ModelCommand, PkiCommand,
    UsageCommand,
};
use config::Config;

/// Runs a parsed command line and returns the process exit code.
pub fn run_cli(cli: Cli) -> u8 {
    match cli.command {
        Command::Serve {
            config,
            accept_broken_audit,
        } => serve(&config, accept_broken_audit),
        Command::CheckConfig { config } => check_config(&config),
        Command::Status {
            socket,
            config,
            json,
        } => status(socket.as_deref(), &config, json),
        Command::Model {
            command: ModelCommand::Inspect { path, json },
        } => inspect_model(&path, json),
        Command::Model {
            command: ModelCommand::Import { paths, config },
        } => match model::import(&paths, &config) {
            Ok(report) => {
                print!("{report}");
                exit::OK
            }
            Err(model::ImportError::Refused(report)) => {
                eprint!("{report}");
                exit::DATA
            }
            Err(model::ImportError::Setup(e)) => {
                eprintln!("airgate model import: {e}");
                exit::CONFIG
            }
            Err(model::ImportError::Io(e)) => {
                eprintln!("airgate model import: {e}");
                exit::CANT_CREATE
            }
        },
        Command::Generate { command } => generate(command),
        Command::Sbom { config, out } => match sbom::run(&config, out.as_deref()) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("airgate sbom: {e}");
                exit::CONFIG
            }
        },
        Command::Report {
            month,
            format,
            out,
            state,
            pack,
            config,
        } => report_command(&month, format, &out, state.as_deref(), &pack, &config),
        Command::Evidence {
            command,
            month,
            out,
            into,
            state,
            config,
        } => evidence_command(
            command,
            month.as_deref(),
            (out.as_deref(), into.as_deref()),
            state.as_deref(),
            &config,
        ),
        Command::Pki { command } => pki_command(command),
        Command::Keygen { dir, name } => report(authority::keygen(&dir, &name)),
        Command::Bundle { command } => report(bundle_command(command)),
        Command::Audit { command } => audit_command(command),
        Command::Usage {
            command,
            month,
            json,
            config,
            socket,
        } => usage_command(command, month.as_deref(), json, socket, &config),
    }
}

fn usage_command(
    command: Option<UsageCommand>,
    month: Option<&str>,
    json: bool,
    socket: Option<PathBuf>,
    config: &Path,
) -> u8 {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("airgate usage: {e}");
        code
    };
    let socket = match daemon_socket(socket, config) {
        Ok(s) => s,
        Err(e) => return fail(exit::CONFIG, &e),
    };
    if let Some(m) = month
        && let Err(e) = usage::parse_month(m)
    {
        return fail(exit::CONFIG, &e);
    }
    let (method, path) = match command {
        Some(UsageCommand::Rebuild) => (http::Method::POST, "/admin/usage/rebuild".to_owned()),
        None => (
            http::Method::GET,
            month.map_or_else(
                || "/admin/usage".to_owned(),
                |m| format!("/admin/usage?month={m}"),
            ),
        ),
    };
    let doc: serde_json::Value = match remote(&socket, method, &path) {
        Ok((_, body)) => serde_json::from_slice(&body).unwrap_or_default(),
        Err(e) => return fail(exit::NO_DAEMON, &e),
    };
    if json || command.is_some() {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return exit::OK;
    }
    print!("{}", usage_table(&doc));
    exit::OK
}

/// The usage report as an operator reads it.
fn usage_table(doc: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = |v: &serde_json::Value| v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string());
    let _ = writeln!(
        out,
        "month {} (bundle version {}, counted through audit record {})",
        doc["month"].as_str().unwrap_or("?"),
        n(&doc["bundle_version"]),
        n(&doc["folded_through_seq"])
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "TENANT", "USERS", "CAP", "REQUESTS", "DENIALS", "TOKENS"
    );
    for t in doc["tenants"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>9} {:>10} {:>9} {:>12}",
            t["tenant"].as_str().unwrap_or("?"),
            n(&t["users"]),
            n(&t["user_cap"]["host_cap"]),
            n(&t["requests"]),
            n(&t["denials"]),
            n(&t["tokens"])
        );
    }
    let _ = writeln!(
        out,
        "\n{:<40} {:>9} {:>10}",
        "LICENCE", "USERS", "THRESHOLD"
    );
    for l in doc["licences"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<40} {:>9} {:>10}",
            l["licence"].as_str().unwrap_or("?"),
            n(&l["users"]),
            n(&l["threshold"])
        );
    }
    for w in doc["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "warning given: {} {} reached {}% of its limit",
            w["scope"].as_str().unwrap_or("?"),
            w["id"].as_str().unwrap_or("?"),
            w["fraction"].as_f64().map_or(0.0, |f| f * 100.0)
        );
    }
    out
}

fn bundle_command(command: BundleCommand) -> Result<String, authority::AuthorityError> {
    match command {
        BundleCommand::Sign {
            key,
            key_id,
            valid_for,
            policy,
            out,
        } => authority::bundle_sign(&key, key_id.as_deref(), &valid_for, &policy, &out),
        BundleCommand::Prepare {
            key_id,
            alg,
            valid_for,
            policy,
            out,
        } => authority::bundle_prepare(&key_id, &alg, &valid_for, &policy, &out),
        BundleCommand::Attach {
            input,
            signature,
            public_key,
            out,
        } => authority::bundle_attach(&input, &signature, &public_key, &out),
        BundleCommand::Verify {
            trust,
            config,
            audience,
            bundle,
        } => authority::bundle_verify(
            trust.as_deref(),
            config.as_deref(),
            audience.as_deref(),
            &bundle,
        ),
        BundleCommand::Inspect { bundle, json } => authority::bundle_inspect(&bundle, json),
        BundleCommand::Diff { old, new } => authority::bundle_diff(&old, &new),
    }
}

fn state_dir(state: Option<PathBuf>, config: &Path) -> Result<PathBuf, String> {
    match state {
        Some(s) => Ok(s),
        None => Config::load(config)
            .map(|c| c.state_dir)
            .map_err(|e| format!("{e}\n(or pass --state DIR)")),
    }
}

/// The running daemon's socket: given, or the configuration's.
fn daemon_socket(socket: Option<PathBuf>, config: &Path) -> Result<PathBuf, String> {
    socket.map_or_else(
        || {
            Config::load(config)
                .map(|c| c.unix.path)
                .map_err(|e| e.to_string())
        },
        Ok,
    )
}

fn audit_command(command: AuditCommand) -> u8 {
    use std::io::Write as _;
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("airgate audit: {e}");
        code
    };
    match command {
        AuditCommand::Verify {
            state,
            config,
            checkpoints,
            from,
        } => {
            let dir = match state_dir(state, &config) {
                Ok(d) => d,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            let checkpoints = match checkpoints.map(|p| read_checkpoints(&p)).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return fail(exit::CONFIG, &e),
            };
            let db = match audit::open_db(&dir.join("audit"), 64 << 20) {
                Ok(db) => db,
                Err(e) => return fail(exit::CANT_CREATE, &e),
            };
            let host = keys::read_public_key(&dir.join("host.pub")).ok();
            if host.is_none() {
                eprintln!(
                    "airgate audit: {}: no host key; checkpoint signatures are not checked",
                    dir.join("host.pub").display()
                );
            }
            let key = host.as_ref().map(|k| k.raw.as_slice());
            match audit::verify_db(&db, checkpoints, key, from) {
                Ok(v) => {
                    let scope = if from > 0 {
                        format!(" (from record {from})")
                    } else {
                        String::new()
                    };
                    println!(
                        "audit chain OK{scope}: {} records, head {}, {} signed checkpoints verified",
                        v.records,
                        keys::hex(&v.head),
                        v.checkpoints
                    );
                    exit::OK
                }
                Err(e) => fail(exit::AUDIT_BROKEN, &e),
            }
        }
        AuditCommand::Export {
            state,
            config,
            from,
            since,
            tenant,
        } => {
            let mut filter = tenant.as_deref().map(audit::TenantFilter::new);
            let since = since.unwrap_or(i64::MIN);
            let mut out = std::io::stdout().lock();
            // A running daemon holds the store: ask it, unless told to read a directory.
            if state.is_none()
                && let Ok(c) = Config::load(&config)
                && std::os::unix::net::UnixStream::connect(&c.unix.path).is_ok()
            {
                let mut next = from;
                loop {
                    let (lines, after) = match remote_page(&c.unix.path, next, false) {
                        Ok(p) => p,
                        Err(e) => return fail(exit::NO_DAEMON, &e),
                    };
                    if lines.is_empty() {
                        return exit::OK;
                    }
                    for line in lines {
                        let record = serde_json::from_str::<serde_json::Value>(&line).ok();
                        // Damaged records (no time, no event) are always shown.
                        let damaged = record.as_ref().is_some_and(|v| v.get("damaged").is_some());
                        let v_seq = record
                            .as_ref()
                            .and_then(|v| v["seq"].as_u64())
                            .unwrap_or(u64::MAX);
                        if record
                            .as_ref()
                            .and_then(|v| v["time"].as_i64())
                            .is_some_and(|t| t < since)
                        {
                            continue;
                        }
                        if let Some(f) = filter.as_mut()
                            && !damaged
                        {
                            let keep = record
                                .and_then(|v| serde_json::from_value(v["event"].clone()).ok())
                                .is_some_and(|e| f.keep(v_seq, &e));
                            if !keep {
                                continue;
                            }
                        }
                        if writeln!(out, "{line}").is_err() {
                            return exit::OK;
                        }
                    }
                    next = after;
                }
            }
            let dir = match state_dir(state, &config) {
                Ok(d) => d,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            let db = match audit::open_db(&dir.join("audit"), 64 << 20) {
                Ok(db) => db,
                Err(e) => return fail(exit::CANT_CREATE, &e),
            };
            // A damaged record is exported as a `damaged` line and the
            // export goes on; the exit status says some were (76).
            let mut damaged = 0u64;
            for item in audit::read_all(&db, from) {
                let (seq, content) = match item {
                    Ok(r) => r,
                    Err(e) => return fail(exit::IO, &e),
                };
                let line = match content {
                    Ok(content) => {
                        if content.time < since {
                            continue;
                        }
                        if let Some(f) = filter.as_mut()
                            && !f.keep(seq, &content.event)
                        {
                            continue;
                        }
                        audit::export_line(seq, &content)
                    }
                    Err(e) => {
                        damaged += 1;
                        eprintln!("airgate: damaged audit record {seq}: {e}");
                        audit::damaged_line(seq, &e)
                    }
                };
                if writeln!(out, "{line}").is_err() {
                    return exit::OK; // the reader went away (e.g. `| head`)
                }
            }
            if damaged > 0 {
                eprintln!(
                    "airgate: {damaged} damaged record(s); `airgate audit verify` reports the chain"
                );
                return exit::AUDIT_BROKEN;
            }
            exit::OK
        }
        AuditCommand::Tail {
            from,
            config,
            socket,
        } => {
            let socket = match daemon_socket(socket, &config) {
                Ok(s) => s,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            let mut next = match from {
                Some(f) => f,
                None => match remote_status(&socket) {
                    Ok(doc) => doc["audit"]["writer"]["records"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(10),
                    Err(e) => return fail(exit::NO_DAEMON, &e),
                },
            };
            let mut out = std::io::stdout().lock();
            loop {
                let (lines, after) = match remote_page(&socket, next, false) {
                    Ok(p) => p,
                    Err(e) => return fail(exit::NO_DAEMON, &e),
                };
                for line in &lines {
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        return exit::OK;
                    }
                }
                next = after;
                if lines.is_empty() {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        AuditCommand::Snapshot { config, socket } => {
            let socket = match daemon_socket(socket, &config) {
                Ok(s) => s,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            match remote(&socket, http::Method::POST, "/admin/audit/snapshot") {
                Ok((_, body)) => {
                    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    println!(
                        "snapshot of {} records in {}\nverify: airgate audit verify --state {}",
                        doc["records"],
                        doc["path"].as_str().unwrap_or("?"),
                        doc["path"].as_str().unwrap_or("?")
                    );
                    exit::OK
                }
                Err(e) => fail(exit::NO_DAEMON, &e),
            }
        }
        AuditCommand::HashUser {
            tenant,
            user,
            state,
            config,
        } => {
            let dir = match state_dir(state, &config) {
                Ok(d) => d,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            // A fleet secret named in the configuration wins over the host's own.
            let secret = Config::load(&config)
                .ok()
                .and_then(|c| c.audit.user_secret)
                .unwrap_or_else(|| dir.join("user-hmac.key"));
            if !secret.exists() {
                return fail(
                    exit::CONFIG,
                    &format!("{}: no such secret", secret.display()),
                );
            }
            match gate::UserHasher::load(&secret) {
                Ok(h) => {
                    println!("{}", keys::hex(&h.key(&tenant, &user).0));
                    exit::OK
                }
                Err(e) => fail(exit::CANT_CREATE, &e),
            }
        }
    }
}

fn report_command(
    month: &str,
    format: report::Format,
    out: &Path,
    state: Option<&Path>,
    packs: &[PathBuf],
    config: &Path,
) -> u8 {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("airgate report: {e}");
        code
    };
    let now = bundle::system_time_now();
    let month = match report::Month::resolve(month, now) {
        Ok(m) => m,
        Err(e) => return fail(exit::CONFIG, &e),
    };
    let built = if packs.is_empty() {
        report::local_inputs(config, state)
            .and_then(|mut inputs| report::build(month, &mut inputs, now))
    } else {
        evidence::merged_report(packs, Some(month), now)
    };
    let r = match built {
        Ok(r) => r,
        Err(e) => return fail(exit::DATA, &e),
    };
    if let Err(e) = report::write_out(out, &r.render(format)) {
        return fail(exit::CANT_CREATE, &e);
    }
    for n in &r.notes {
        eprintln!("airgate report: {n}");
    }
    if out != Path::new("-") {
        eprintln!(
            "{}: {} {}: {} decisions, {} distinct users, chain {}",
            out.display(),
            r.month,
            match format {
                report::Format::Html => "HTML",
                report::Format::Json => "JSON",
                report::Format::Md => "Markdown",
            },
            r.totals.decisions,
            r.totals.distinct_users,
            if r.chain_verified {
                "verified"
            } else {
                "NOT VERIFIED"
            }
        );
    }
    if r.chain_verified {
        exit::OK
    } else {
        exit::AUDIT_BROKEN
    }
}

fn evidence_command(
    command: Option<cli::EvidenceCommand>,
    month: Option<&str>,
    (out, into): (Option<&Path>, Option<&Path>),
    state: Option<&Path>,
    config: &Path,
) -> u8 {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("airgate evidence: {e}");
        code
    };
    match command {
        Some(cli::EvidenceCommand::Verify { pack, host_key }) => {
            let opened = match evidence::open(&pack) {
                Ok(o) => o,
                Err(e) => return fail(exit::DATA, &e),
            };
            match evidence::verify(&opened.dir, host_key.as_deref()) {
                Ok(c) => {
                    println!(
                        "evidence pack OK: {} of host {}{}\n  \
                         {} files match the signed manifest\n  \
                         {} audit records (seq {}-{}) verify, {} signed checkpoints; the month is {}\n  \
                         {} bundles verify against the pack's trust anchors; the report matches the records",
                        c.info.month,
                        c.host_key_sha256,
                        if c.host_key_from_pack {
                            " (key taken from the pack: compare this fingerprint with the host's)"
                        } else {
                            ""
                        },
                        c.files,
                        c.records,
                        c.info.first_seq,
                        c.info.last_seq,
                        c.checkpoints,
                        match (c.month_covered, c.info.month_over) {
                            (true, true) => "wholly between signed checkpoints",
                            (true, false) =>
                                "not over: its records so far are wholly between signed checkpoints",
                            (false, true) => "NOT wholly between signed checkpoints",
                            (false, false) =>
                                "not over, and its last records are not yet vouched for by a checkpoint",
                        },
                        c.bundles
                    );
                    exit::OK
                }
                Err(problems) => {
                    eprintln!("airgate evidence: {} does NOT verify:", pack.display());
                    for p in problems {
                        eprintln!("  {p}");
                    }
                    exit::DATA
                }
            }
        }
        None => {
            let usage = "give --month YYYY-MM and -o DIR|FILE.tar or --into DIR (or `evidence verify PACK`)";
            let Some(month) = month else {
                return fail(exit::CONFIG, &usage);
            };
            let now = bundle::system_time_now();
            let month = match report::Month::resolve(month, now) {
                Ok(m) => m,
                Err(e) => return fail(exit::CONFIG, &e),
            };
            let made = match (out, into) {
                (Some(out), _) => evidence::create(config, state, month, out, now)
                    .map(|made| (out.to_owned(), made)),
                (None, Some(dir)) => {
                    if now < month.end {
                        return fail(
                            exit::CONFIG,
                            &format!(
                                "{} is not over: --into writes a month's final pack (-o writes one of the month so far)",
                                month.name()
                            ),
                        );
                    }
                    match evidence::create_into(config, state, month, dir, now) {
                        Ok(evidence::Monthly::Written(path, made)) => Ok((path, *made)),
                        Ok(evidence::Monthly::Exists(path)) => {
                            println!(
                                "{}: the pack of {} was written before; left as it is",
                                path.display(),
                                month.name()
                            );
                            return exit::OK;
                        }
                        Ok(evidence::Monthly::NotYetVouched) => {
                            return fail(
                                exit::NO_DAEMON,
                                &format!(
                                    "the last records of {} are not yet vouched for by a signed checkpoint (the daemon seals one within audit.checkpoint_interval of them, or at a clean stop): nothing written; try again later",
                                    month.name()
                                ),
                            );
                        }
                        Err(e) => Err(e),
                    }
                }
                (None, None) => return fail(exit::CONFIG, &usage),
            };
            match made {
                Ok((out, evidence::Made { info, .. })) => {
                    println!(
                        "{}: evidence pack of {} (host {}, records {}-{})\ncheck it: airgate evidence verify {}",
                        out.display(),
                        info.month,
                        info.host_key_sha256,
                        info.first_seq,
                        info.last_seq,
                        out.display()
                    );
                    match &info.chain_error {
                        None => exit::OK,
                        Some(e) => fail(
                            exit::AUDIT_BROKEN,
                            &format!(
                                "the audit chain does NOT verify ({e}); the pack records the break and will not verify"
                            ),
                        ),
                    }
                }
                Err(e) => fail(exit::CANT_CREATE, &e),
            }
        }
    }
}

/// One operator request to the daemon; an answer other than 2xx is an error.
fn remote(
    socket: &Path,
    method: http::Method,
    path: &str,
) -> Result<(http::HeaderMap, bytes::Bytes), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (status, headers, body) = runtime
        .block_on(client::request(socket, method, path))
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(format!(
            "{status}: {}",
            doc["error"]["message"].as_str().unwrap_or("(no message)")
        ));
    }
    Ok((headers, body))
}

fn remote_status(socket: &Path) -> Result<serde_json::Value, String> {
    let (_, body) = remote(socket, http::Method::GET, "/admin/status")?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// A page of export lines from `from` (with `raw`, stored records as
/// [`report::raw_line`]s), and the sequence after it.
pub(crate) fn remote_page(
    socket: &Path,
    from: u64,
    raw: bool,
) -> Result<(Vec<String>, u64), String> {
    let query = if raw {
        "&limit=5000&raw=1"
    } else {
        "&limit=1000"
    };
    let (headers, body) = remote(
        socket,
        http::Method::GET,
        &format!("/admin/audit/records?from={from}{query}"),
    )?;
    let next = headers
        .get("x-airgate-next")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(from);
    let text = String::from_utf8_lossy(&body);
    Ok((text.lines().map(str::to_owned).collect(), next))
}

/// `SEQ HASH` per line; blank lines and `#` comments skipped.
fn read_checkpoints(path: &Path) -> Result<Vec<(u64, [u8; 32])>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{}:{}: expected `SEQ HASH`", path.display(), i + 1);
        let (seq, hash) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        let h = keys::unhex32(hash.trim()).ok_or_else(bad)?;
        out.push((seq, h));
    }
    Ok(out)
}

/// Prints a command's report, or its error with the matching exit code.
fn report(result: Result<String, authority::AuthorityError>) -> u8 {
    match result {
        Ok(text) => {
            println!("{text}");
            exit::OK
        }
        Err(e) => {
            eprintln!("airgate: {e}");
            e.exit_code()
        }
    }
}

fn pki_command(command: PkiCommand) -> u8 {
    let result = match command {
        PkiCommand::Init { dir, name, days } => pki::init(&dir, &name, days),
        PkiCommand::Server {
            dir,
            out,
            dns,
            ip,
            days,
        } => pki::server(&dir, &out, &dns, &ip, days),
        PkiCommand::Client {
            dir,
            out,
            uri,
            days,
        } => pki::client(&dir, &out, &uri, days),
        PkiCommand::Revoke {
            dir,
            cert,
            crl_days,
        } => pki::revoke(&dir, &cert, crl_days).map(|serial| {
            println!("revoked serial {serial}");
            vec![dir.join("crl.pem")]
        }),
        PkiCommand::Crl { dir, days } => pki::crl(&dir, days).map(|p| vec![p]),
    };
    match result {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            exit::OK
        }
        Err(e @ pki::PkiError::Usage(_)) => {
            eprintln!("airgate pki: {e}");
            exit::CONFIG
        }
        Err(e) => {
            eprintln!("airgate pki: {e}");
            exit::CANT_CREATE
        }
    }
}

fn check_config(path: &Path) -> u8 {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("{e}");
            exit::CONFIG
        }
    }
}

/// `airgate serve`: the start-up order is configuration (every error,
/// exit 64) -> logging -> sockets from systemd -> runtime -> bind -> READY
/// -> serve -> drain on SIGTERM/SIGINT, reload on SIGHUP, a full audit
/// verification on SIGUSR1.
fn serve(path: &Path, accept_broken_audit: bool) -> u8 {
    // The configuration decides where logs go, so it is read first; its
    // errors go to stderr, which systemd also sends to the journal.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airgate: {e}");
            return exit::CONFIG;
        }
    };
    let (log, log_target) = logging::init(&config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        logs = log_target,
        "starting"
    );
    let prepared = match server::Prepared::with_tls(config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "listen.tls: cannot load the TLS material");
            eprintln!("airgate: listen.tls: {e}");
            return exit::CONFIG;
        }
    };
    let failpoints = match failpoint::Failpoints::from_env() {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "bad failpoint specification");
            return exit::CONFIG;
        }
    };
    if failpoints.any() {
        tracing::warn!(failpoints = ?failpoints, "FAULT INJECTION ACTIVE ({}): for tests only", failpoint::ENV);
    }
    if let Some(offset) = failpoints.clock_offset {
        bundle::set_clock_offset(offset);
    }
    if let Err(e) = sys::ignore_file_size_signal() {
        tracing::warn!(error = %e, "cannot ignore SIGXFSZ");
    }
    // Before any thread exists: this reads and unsets LISTEN_* variables.
    let mut activated = match systemd::ActivatedFds::take() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "bad socket activation environment");
            return exit::UNAVAILABLE;
        }
    };
    if let Err(e) = server::prepare_state_dir(&prepared.config.state_dir) {
        tracing::error!(error = %e, "cannot use the state directory");
        return exit::CANT_CREATE;
    }
    let state = match server::State::open(&prepared.config, accept_broken_audit) {
        Ok(s) => s,
        Err(server::StateError::Audit(e @ audit::AuditError::Broken(_))) => {
            tracing::error!(error = %e, "AUDIT CHAIN BROKEN: not starting; inspect with `airgate audit verify`");
            eprintln!("airgate: {e}");
            return exit::AUDIT_BROKEN;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot open the state directory");
            eprintln!("airgate: {e}");
            return exit::CANT_CREATE;
        }
    };
    // The inbox under the state directory is ours to create; one elsewhere
    // (e.g. /etc/airgate/inbox) is the operator's.
    let inbox = &prepared.config.policy.inbox;
    if inbox.starts_with(&prepared.config.state_dir) && !inbox.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(inbox) {
            tracing::warn!(inbox = %inbox.display(), error = %e, "cannot create the bundle inbox");
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("airgate")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return exit::SOFTWARE;
        }
    };
    let code = runtime.block_on(async move {
        let unix = match listener::UnixSocket::open(&prepared.config.unix, &mut activated) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the Unix socket");
                return exit::UNAVAILABLE;
            }
        };
        let tls_socket = match &prepared.config.tls {
            Some(tls) => match listener::TcpSocket::open(tls, &mut activated).await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot open the TLS listener");
                    return exit::UNAVAILABLE;
                }
            },
            None => None,
        };
        for (name, fd) in activated.into_unclaimed() {
            tracing::warn!(
                name,
                fd,
                "socket passed by systemd matches no configured listener; closing it"
            );
            sys::close_unclaimed(fd);
        }
        let signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return exit::SOFTWARE;
            }
        };
        let daemon = server::Daemon::new(prepared, state, Some(log), failpoints);
        let reloader = daemon.clone();
        let config_path = path.to_owned();
        let Signals {
            mut term,
            mut int,
            mut hup,
            mut usr1,
        } = signals;
        let verifier = daemon.clone();
        let verify_task = tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                tracing::info!("SIGUSR1: verifying the whole audit chain");
                verifier.verify_audit();
            }
        });
        let reload_task = tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                let path = config_path.clone();
                let next = tokio::task::spawn_blocking(move || server::prepare(&path))
                    .await
                    .unwrap_or_else(|e| {
                        Err(server::PrepareError::Config(config::ConfigError::Read {
                            path: config_path.clone(),
                            source: std::io::Error::other(e.to_string()),
                        }))
                    });
                reloader.reload(next);
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        daemon
            .run(
                listener::Listeners {
                    unix,
                    tls: tls_socket,
                },
                shutdown,
            )
            .await;
        reload_task.abort();
        verify_task.abort();
        exit::OK
    });
    // A worker stuck in a blocking call must not hold the process hostage.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    /// A full verification of the audit chain (see `server::run_full_verify`).
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

fn status(socket: Option<&Path>, config: &Path, json: bool) -> u8 {
    let socket = match socket {
        Some(s) => s.to_owned(),
        None => match Config::load(config) {
            Ok(c) => c.unix.path,
            Err(e) => {
                eprintln!("airgate: {e}\n(pass --socket to name the daemon's socket directly)");
                return exit::CONFIG;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airgate: cannot start the async runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    let (code, body) = match runtime.block_on(client::get(&socket, "/admin/status")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airgate: {e}");
            return exit::NO_DAEMON;
        }
    };
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if !code.is_success() {
        let message = doc["error"]["message"].as_str().unwrap_or("(no message)");
        eprintln!("airgate: the daemon answered {code}: {message}");
        return exit::NO_DAEMON;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", render_status(&doc));
    }
    exit::OK
}

fn render_status(doc: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "airgate {} (pid {}), up {}s",
        doc["version"].as_str().unwrap_or("?"),
        doc["pid"],
        doc["uptime_seconds"]
    );
    let reasons: Vec<&str> = doc["not_ready_reasons"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.as_str()).collect())
        .unwrap_or_default();
    if reasons.is_empty() {
        let _ = writeln!(out, "ready:       yes");
    } else {
        let _ = writeln!(out, "ready:       no: {}", reasons.join("; "));
    }
    for l in doc["listeners"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "listener:    {} {} {}{}",
            l["name"].as_str().unwrap_or("?"),
            l["kind"].as_str().unwrap_or("?"),
            l["address"].as_str().unwrap_or("?"),
            if l["activated"].as_bool() == Some(true) {
                " (socket-activated)"
            } else {
                ""
            }
        );
    }
    if let Some(tls) = doc["tls"].as_object() {
        let cert = &tls["server_certificate"];
        let days_left = (cert["not_after"].as_i64().unwrap_or(0)
            - doc["started_at_unix"].as_i64().unwrap_or(0)
            - doc["uptime_seconds"].as_i64().unwrap_or(0))
            / 86_400;
        let crls = tls["crls"].as_array().map_or(0, Vec::len);
        let expired = tls["crls"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["expired"] == true).count());
        let _ = writeln!(
            out,
            "tls:         server certificate {} expires in {days_left} days; {crls} CRL(s), {expired} expired (expired_crl = {})",
            cert["subject"].as_str().unwrap_or("?"),
            tls["expired_crl"].as_str().unwrap_or("?"),
        );
    }
    let bundle = &doc["bundle"];
    match bundle["in_force"].as_object() {
        Some(b) => {
            let _ = writeln!(
                out,
                "bundle:      version {} ({}) signed by {}, expires {}, {}; {} tenant(s), {} model(s)",
                b["version"],
                b["digest"].as_str().map_or("?", |d| &d[..d.len().min(12)]),
                b["key_id"].as_str().unwrap_or("?"),
                b["expires"],
                bundle["freshness"].as_str().unwrap_or("?"),
                b["tenants"].as_array().map_or(0, Vec::len),
                b["models"].as_array().map_or(0, Vec::len),
            );
        }
        None => {
            let _ = writeln!(out, "bundle:      none in force");
        }
    }
    if let Some(u) = bundle["last_update"].as_object() {
        let _ = writeln!(
            out,
            "last bundle: {} {}: {}",
            u["file"].as_str().unwrap_or("?"),
            u["result"].as_str().unwrap_or("?"),
            u["message"].as_str().unwrap_or("")
        );
    }
    for w in doc["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "WARNING:     {}", w.as_str().unwrap_or("?"));
    }
    let v = &doc["audit"]["full_verify"];
    if v.is_object() {
        let _ = writeln!(
            out,
            "audit:       full verification {} at {} ({} records{})",
            v["result"].as_str().unwrap_or("?"),
            v["at_unix"],
            v["records"],
            v["first_bad_seq"]
                .as_u64()
                .map_or_else(String::new, |s| format!(", first bad record {s}"))
        );
    }
    let _ = writeln!(
        out,
        "connections: {} of {}",
        doc["connections"]["active"], doc["connections"]["max"]
    );
    for w in doc["workers"].as_array().into_iter().flatten() {
        let state = if w["stuck"].as_bool() == Some(true) {
            "STUCK"
        } else if w["idle"].as_bool() == Some(true) {
            "idle"
        } else {
            "ok"
        };
        let _ = writeln!(
            out,
            "worker:      {} {} (last progress {} ms ago)",
            w["name"].as_str().unwrap_or("?"),
            state,
            w["since_progress_ms"]
        );
    }
    let _ = writeln!(
        out,
        "watchdog:    {}",
        if doc["watchdog"]["enabled"].as_bool() == Some(true) {
            format!("every {} ms", doc["watchdog"]["period_ms"])
        } else {
            "off".to_owned()
        }
    );
    if let Some(r) = doc["last_reload"].as_object() {
        let _ = writeln!(
            out,
            "last reload: {} at {}",
            if r["ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "REFUSED"
            },
            r["at_unix"]
        );
    }
    out
}

/// Man pages and completions from the clap definition, for the package.
fn generate(command: GenerateCommand) -> u8 {
    use clap::CommandFactory as _;
    let result = match command {
        GenerateCommand::Man { out } => std::fs::create_dir_all(&out).and_then(|()| {
            let cmd = Cli::command();
            let mut pages = vec![(String::from("airgate"), cmd.clone())];
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                // The page's name is the command's, leaked once per page (a
                // short-lived generating process).
                let name: &'static str = format!("airgate-{}", sub.get_name()).leak();
                pages.push((name.to_owned(), sub.clone().name(name)));
            }
            for (name, page) in pages {
                let mut bytes = Vec::new();
                clap_mangen::Man::new(page).render(&mut bytes)?;
                std::fs::write(out.join(format!("{name}.1")), bytes)?;
            }
            Ok(())
        }),
        GenerateCommand::Completions { out } => std::fs::create_dir_all(&out).and_then(|()| {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut Cli::command(), "airgate", &out)?;
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("airgate generate: {e}");
            exit::CANT_CREATE
        }
    }
}

fn inspect_model(path: &Path, json: bool) -> u8 {
    match model::inspect(path) {
        Ok(info) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
            exit::OK
        }
        Ok(info) => {
            println!("{info}");
            exit::OK
        }
        Err(e) => {
            eprintln!("airgate: {e}");
            exit::DATA
        }
    }
}
