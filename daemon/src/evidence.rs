//! Evidence packs: what an auditor takes away for a month, and checks
//! without the daemon.
//!
//! A pack is a directory (or a tar of one):
//!
//! ```text
//! pack.json               month, host key, user-secret fingerprint, the run of records
//! host.pub                the host key that signed the checkpoints and this pack
//! audit/records.jsonl     the stored records, byte for byte, from the last signed
//!                         checkpoint at or before the month to the first after it
//! audit/export.jsonl      the month's records, readable (as `airgate audit export`)
//! audit/checkpoints.txt   `SEQ HASH` the checkpoints vouch for (`audit verify --checkpoints`)
//! bundles/DIGEST.jwt      the policy bundles in force during the month
//! trust/KEYID.pub         the trust anchors they were verified with
//! models.json             the model manifest of those bundles
//! sbom.cdx.json           CycloneDX ML-BOM of the latest bundle in force
//! report.json|html|md     the month's report
//! pack-manifest.json      every file above with its SHA-256 and size
//! pack-manifest.sig       Ed25519 (host key) over a domain tag and the manifest
//! ```
//!
//! `airgate evidence verify` checks the signature, every file's digest
//! (naming the first that differs, and any file added or missing), the run
//! of records (hashes, links, every checkpoint's signature), each bundle's
//! digest and signature, and that the report matches the records.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::keys::hex;
use crate::report::{self, Host, Inputs, Month, Records, Report, Tally};

pub const FORMAT: u32 = 1;
const MANIFEST: &str = "pack-manifest.json";
const SIGNATURE: &str = "pack-manifest.sig";
const DOMAIN: &[u8] = b"airgate-evidence-v1\0";

/// `pack.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackInfo {
    pub format: u32,
    pub month: String,
    pub host_key_sha256: String,
    /// HMAC of a fixed tag under the user-hashing secret: packs with the same
    /// fingerprint hash the same user the same way (their counts merge).
    pub user_secret_fingerprint: Option<String>,
    pub created: String,
    pub generator: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// (version, digest, accepted at) of the bundle in force as the month began.
    pub bundle_at_start: Option<(u64, String, i64)>,
    /// Made after the month ended (else it holds the month so far).
    #[serde(default)]
    pub month_over: bool,
    /// Why the host's chain does not verify, if it does not.
    #[serde(default)]
    pub chain_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    kind: String,
    month: String,
    host_key_sha256: String,
    created: String,
    files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ManifestFile {
    path: String,
    sha256: String,
    bytes: u64,
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest as _;
    let mut file = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let bytes = std::io::copy(&mut file, &mut h)?;
    Ok((hex(&h.finalize()), bytes))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// The run of records being written to `audit/records.jsonl`.
struct Run {
    records: std::fs::File,
    checkpoints: Vec<String>,
    export: std::io::BufWriter<std::fs::File>,
    first: Option<u64>,
    last: u64,
    done: bool,
}

/// What [`create`] made.
pub struct Made {
    pub info: PackInfo,
    /// The month lies wholly between signed checkpoints.
    pub month_covered: bool,
}

/// What `airgate evidence --into DIR` did.
pub enum Monthly {
    /// The pack was written under its month's name.
    Written(PathBuf, Box<Made>),
    /// A pack of that month was there already; it was left as it is.
    Exists(PathBuf),
    /// The month's last records are not yet vouched for by a signed
    /// checkpoint: nothing was written (try again once one is sealed).
    NotYetVouched,
}

/// `airgate evidence --month M --into DIR`, for a month that is over:
/// `DIR/airgate-evidence-M.tar`, written once, and only when the month is
/// vouched for through its end (or its chain is broken: that pack is the
/// evidence of the break).
pub fn create_into(
    config: &Path,
    state: Option<&Path>,
    month: Month,
    dir: &Path,
    now: i64,
) -> Result<Monthly, String> {
    let named = dir.join(format!("airgate-evidence-{}.tar", month.name()));
    if named.exists() {
        return Ok(Monthly::Exists(named));
    }
    let pending = dir.join(format!(".airgate-evidence-{}.pending.tar", month.name()));
    match std::fs::remove_file(&pending) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&pending)(e)),
    }
    let made = create(config, state, month, &pending, now)?;
    if made.info.chain_error.is_none() && !made.month_covered {
        let _ = std::fs::remove_file(&pending);
        return Ok(Monthly::NotYetVouched);
    }
    let placed = place(&pending, &named);
    let _ = std::fs::remove_file(&pending);
    sync_dir(dir)?;
    Ok(if placed? {
        Monthly::Written(named, Box::new(made))
    } else {
        Monthly::Exists(named)
    })
}

/// Puts the finished file `tmp` at `out` unless something is there: a
/// link, not a rename, so a pack that appeared meanwhile is kept. Returns
/// whether it was placed.
fn place(tmp: &Path, out: &Path) -> Result<bool, String> {
    match std::fs::hard_link(tmp, out) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // File systems without hard links (removable media).
        Err(_) if out.exists() => Ok(false),
        Err(_) => std::fs::rename(tmp, out).map(|()| true).map_err(io(out)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// `airgate evidence --month M -o OUT`: the pack of this host's month, read
/// from the running daemon or a stopped store. OUT is a directory, or a
/// file ending in `.tar`.
pub fn create(
    config: &Path,
    state: Option<&Path>,
    month: Month,
    out: &Path,
    now: i64,
) -> Result<Made, String> {
    let mut inputs = report::local_inputs(config, state)?;
    let state = inputs
        .state
        .clone()
        .ok_or("no state directory to take the host key from")?;
    let signer = host_signer(&state)?;
    {
        use ring::signature::KeyPair as _;
        if signer.public_key().as_ref() != inputs.hosts[0].host_key.as_slice() {
            return Err(format!(
                "{}: host.key and host.pub are not a pair",
                state.display()
            ));
        }
    }
    let as_tar = out.extension().is_some_and(|e| e == "tar");
    if out.exists() {
        return Err(format!(
            "{}: already exists (an evidence pack is never overwritten)",
            out.display()
        ));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".airgate-evidence-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let dir = staging.path();
    for d in ["audit", "bundles", "trust"] {
        std::fs::create_dir_all(dir.join(d)).map_err(io(dir))?;
    }
    let records_path = dir.join("audit/records.jsonl");
    let mut run = Run {
        records: std::fs::File::create(&records_path).map_err(io(&records_path))?,
        checkpoints: Vec::new(),
        export: std::io::BufWriter::new(
            std::fs::File::create(dir.join("audit/export.jsonl")).map_err(io(dir))?,
        ),
        first: None,
        last: 0,
        done: false,
    };
    let mut tally = Tally::new(month);
    let host = &inputs.hosts[0];
    tally.scan(host, &mut |tally, index, seq, stored, content, signed| {
        let time = content.map(|c| c.time);
        let before = time.is_some_and(|t| t <= month.start);
        if before && signed {
            // A later signed starting point: the run restarts here.
            use std::io::Seek as _;
            run.records
                .set_len(0)
                .and_then(|()| run.records.seek(std::io::SeekFrom::Start(0)).map(|_| ()))
                .map_err(io(&records_path))?;
            run.checkpoints.clear();
            run.first = None;
        }
        if run.done {
            return Ok(());
        }
        writeln!(run.records, "{}", report::raw_line(seq, stored)).map_err(io(&records_path))?;
        run.first.get_or_insert(seq);
        run.last = seq;
        if signed
            && let Some(c) = content
            && let airgate_policy::audit::Event::Checkpoint { seq: at, head, .. } = &c.event
        {
            run.checkpoints.push(format!("{at} {head}"));
        }
        match content {
            Some(c) if month.contains(c.time) => {
                writeln!(run.export, "{}", crate::audit::export_line(seq, c))
                    .map_err(io(&records_path))?;
            }
            Some(c) if c.time >= month.end => {
                // After the month: on to the first checkpoint once every
                // request of the month has its completion.
                if signed && tally.pending_of(index) == 0 {
                    run.done = true;
                }
            }
            Some(_) => {}
            None => {
                writeln!(run.export, "{}", crate::audit::damaged_line(seq, "damaged"))
                    .map_err(io(&records_path))?;
            }
        }
        Ok(())
    })?;
    run.records.sync_all().map_err(io(&records_path))?;
    run.export.flush().map_err(io(dir))?;
    let bundle_at_start = tally.bundle_at_start(0);
    // A chain that does not verify still gets its pack (it is the evidence
    // of the break); the report inside says where, and so does the caller.
    let report = tally.finish(&mut inputs.bundles, now);
    let month_covered = report.hosts[0].month_covered;
    let mut checkpoints = run.checkpoints.join("\n");
    checkpoints.push('\n');
    write(dir, "audit/checkpoints.txt", checkpoints.as_bytes())?;

    // Bundles in force and the anchors they verify with.
    let mut models = Vec::new();
    let mut latest: Option<(u64, String)> = None;
    for row in &report.bundles {
        let Some(b) = inputs.bundles.get(&row.digest) else {
            continue;
        };
        write(
            dir,
            &format!("bundles/{}.jwt", row.digest),
            b.token.as_bytes(),
        )?;
        models.push(json!({
            "bundle_version": b.bundle.version,
            "bundle_digest": row.digest,
            "models": manifest_of(&b.bundle),
        }));
        if latest.as_ref().is_none_or(|(v, _)| *v < b.bundle.version) {
            latest = Some((b.bundle.version, row.digest.clone()));
        }
    }
    write(dir, "models.json", &pretty(&Value::from(models)))?;
    if let Some((_, digest)) = &latest
        && let Some(b) = inputs.bundles.get(digest)
    {
        let doc = crate::sbom::document(&b.bundle, digest, &report.generated_at);
        write(dir, "sbom.cdx.json", &pretty(&doc))?;
    }
    if let Some(c) = &inputs.config {
        for a in &c.trust.anchors {
            let pem = std::fs::read(&a.public_key).map_err(io(&a.public_key))?;
            write(dir, &format!("trust/{}.pub", safe_name(&a.key_id)), &pem)?;
        }
    }
    let host_pub = std::fs::read(state.join("host.pub")).map_err(io(&state))?;
    write(dir, "host.pub", &host_pub)?;
    write(
        dir,
        "report.json",
        report.render(report::Format::Json).as_bytes(),
    )?;
    write(
        dir,
        "report.html",
        report.render(report::Format::Html).as_bytes(),
    )?;
    write(
        dir,
        "report.md",
        report.render(report::Format::Md).as_bytes(),
    )?;

    let info = PackInfo {
        format: FORMAT,
        month: month.name(),
        host_key_sha256: report.hosts[0].host_key_sha256.clone(),
        user_secret_fingerprint: user_secret_fingerprint(inputs.config.as_ref(), &state),
        created: report.generated_at.clone(),
        generator: report.generator.clone(),
        first_seq: run.first.unwrap_or(0),
        last_seq: run.last,
        bundle_at_start,
        month_over: now >= month.end,
        chain_error: report.hosts[0].error.clone(),
    };
    write(
        dir,
        "pack.json",
        &pretty(&serde_json::to_value(&info).unwrap_or_default()),
    )?;
    sign(dir, &info, &signer)?;

    if as_tar {
        let tmp = parent.join(format!(
            ".{}.tmp",
            out.file_name()
                .map_or("pack".into(), |n| n.to_string_lossy())
        ));
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut builder = tar::Builder::new(file);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", dir).map_err(io(&tmp))?;
        let file = builder.into_inner().map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        let placed = place(&tmp, out);
        let _ = std::fs::remove_file(&tmp);
        if !placed? {
            return Err(format!(
                "{}: already exists (an evidence pack is never overwritten)",
                out.display()
            ));
        }
    } else {
        let kept = staging.keep();
        std::fs::rename(&kept, out).map_err(io(out))?;
    }
    sync_dir(parent)?;
    Ok(Made {
        info,
        month_covered,
    })
}

/// The model manifest of a bundle, as `models.json` lists it.
fn manifest_of(bundle: &airgate_policy::bundle::Bundle) -> Value {
    bundle
        .models
        .values()
        .map(|m| {
            json!({
                "id": m.id,
                "format": format!("{:?}", m.format).to_lowercase(),
                "kinds": m.kinds.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
                "licence": m.licence,
                "licence_chain": m.licence_chain,
                "derived_from": m.derived_from,
                "files": m.files.iter().map(|f| json!({
                    "role": f.role, "name": f.name, "sha256": hex(&f.sha256),
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).map_err(io(&path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&path))
}

fn host_signer(state: &Path) -> Result<ring::signature::Ed25519KeyPair, String> {
    let path = state.join("host.key");
    let key = crate::keys::read_private_key(&path).map_err(|e| {
        format!("{e}: the pack is signed with the host key (run as root or the airgate user)")
    })?;
    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key.pkcs8)
        .map_err(|e| format!("{}: not an Ed25519 key: {e}", path.display()))
}

/// The secret that hashes user ids: the configuration's fleet secret, or the host's own.
fn user_secret_fingerprint(config: Option<&crate::config::Config>, state: &Path) -> Option<String> {
    let path = config
        .and_then(|c| c.audit.user_secret.clone())
        .unwrap_or_else(|| state.join("user-hmac.key"));
    crate::gate::UserHasher::load(&path)
        .ok()
        .map(|h| h.fingerprint())
}

/// Lists every file under `dir` (relative, `/`-separated), sorted.
fn files_of(dir: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let kind = entry.file_type().map_err(io(&d))?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sign(
    dir: &Path,
    info: &PackInfo,
    signer: &ring::signature::Ed25519KeyPair,
) -> Result<(), String> {
    let mut files = Vec::new();
    for rel in files_of(dir)? {
        let (sha256, bytes) = sha256_file(&dir.join(&rel)).map_err(io(dir))?;
        files.push(ManifestFile {
            path: rel,
            sha256,
            bytes,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        kind: "airgate-evidence-pack".to_owned(),
        month: info.month.clone(),
        host_key_sha256: info.host_key_sha256.clone(),
        created: info.created.clone(),
        files,
    };
    let bytes = pretty(&serde_json::to_value(&manifest).unwrap_or_default());
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(&bytes);
    let signature = signer.sign(&message);
    write(dir, MANIFEST, &bytes)?;
    write(
        dir,
        SIGNATURE,
        format!("{}\n", hex(signature.as_ref())).as_bytes(),
    )
}

/// A pack opened for reading: its directory (a tar is unpacked into a
/// temporary one, removed on drop).
pub struct Opened {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

pub fn open(pack: &Path) -> Result<Opened, String> {
    if pack.is_dir() {
        return Ok(Opened {
            dir: pack.to_owned(),
            _temp: None,
        });
    }
    let file = std::fs::File::open(pack).map_err(io(pack))?;
    let temp = tempfile::Builder::new()
        .prefix("airgate-pack-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(file);
    for entry in archive
        .entries()
        .map_err(|e| format!("{}: not a tar file: {e}", pack.display()))?
    {
        let mut entry = entry.map_err(|e| format!("{}: {e}", pack.display()))?;
        let kind = entry.header().entry_type();
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!(
                "{}: entry {} escapes the pack",
                pack.display(),
                path.display()
            ));
        }
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(format!(
                "{}: entry {} is not a plain file",
                pack.display(),
                path.display()
            ));
        }
        let dest = temp.path().join(&path);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(io(p))?;
        }
        entry
            .unpack(&dest)
            .map_err(|e| format!("{}: {}: {e}", pack.display(), path.display()))?;
    }
    Ok(Opened {
        dir: temp.path().to_owned(),
        _temp: Some(temp),
    })
}

/// What verifying a pack found.
#[derive(Debug)]
pub struct Checked {
    pub info: PackInfo,
    pub files: usize,
    pub records: u64,
    pub checkpoints: u64,
    pub bundles: usize,
    pub month_covered: bool,
    pub host_key_sha256: String,
    pub host_key_from_pack: bool,
    /// The raw key the pack verified under.
    pub host_key: Vec<u8>,
}

/// Checks an opened pack; `Err` lists every problem, each naming its file.
pub fn verify(dir: &Path, host_key: Option<&Path>) -> Result<Checked, Vec<String>> {
    let mut problems = Vec::new();
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let manifest_bytes = read(MANIFEST).map_err(|e| vec![e])?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| vec![format!("{MANIFEST}: not a pack manifest: {e}")])?;
    if manifest.format > FORMAT {
        return Err(vec![format!(
            "{MANIFEST}: format {} is newer than this airgate reads ({FORMAT})",
            manifest.format
        )]);
    }
    let (key, from_pack) = match host_key {
        Some(p) => (
            crate::keys::read_public_key(p).map_err(|e| vec![e.to_string()])?,
            false,
        ),
        None => (
            crate::keys::read_public_key(&dir.join("host.pub"))
                .map_err(|e| vec![format!("host.pub: {e}")])?,
            true,
        ),
    };
    let fingerprint = key.fingerprint();
    if fingerprint != manifest.host_key_sha256 {
        return Err(vec![format!(
            "{MANIFEST}: names host key {}, not {fingerprint}{}",
            manifest.host_key_sha256,
            if from_pack {
                " (host.pub)"
            } else {
                " (the key given)"
            }
        )]);
    }
    let signature = read(SIGNATURE).map_err(|e| vec![e])?;
    let signature = String::from_utf8_lossy(&signature);
    let sig = crate::keys::unhex(signature.trim()).unwrap_or_default();
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(&manifest_bytes);
    if ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key.raw)
        .verify(&message, &sig)
        .is_err()
    {
        return Err(vec![format!(
            "{MANIFEST}: the signature does not verify under host key {fingerprint} (the manifest or {SIGNATURE} was modified)"
        )]);
    }

    // Every file as the signed manifest lists it; nothing added, nothing missing.
    let listed: BTreeMap<&str, &ManifestFile> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let present = files_of(dir).map_err(|e| vec![e])?;
    for rel in &present {
        if rel == MANIFEST || rel == SIGNATURE {
            continue;
        }
        match listed.get(rel.as_str()) {
            None => problems.push(format!("{rel}: not in the signed manifest (added)")),
            Some(f) => match sha256_file(&dir.join(rel)) {
                Ok((sha, _)) if sha == f.sha256 => {}
                Ok((sha, bytes)) => problems.push(format!(
                    "{rel}: modified (sha256 {sha}, {bytes} bytes; the signed manifest says {}, {} bytes)",
                    f.sha256, f.bytes
                )),
                Err(e) => problems.push(format!("{rel}: {e}")),
            },
        }
    }
    for f in &manifest.files {
        if !present.contains(&f.path) {
            problems.push(format!("{}: missing", f.path));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let info: PackInfo = serde_json::from_slice(&read("pack.json").map_err(|e| vec![e])?)
        .map_err(|e| vec![format!("pack.json: {e}")])?;
    let month = Month::parse(&info.month).map_err(|e| vec![format!("pack.json: {e}")])?;

    // The records: hashes, links, checkpoint signatures; the report matches them.
    let mut inputs = pack_inputs(&[(dir.to_owned(), info.clone(), key.raw.clone())]);
    let rebuilt = report::build(month, &mut inputs, 0).map_err(|e| vec![e])?;
    let chain = &rebuilt.hosts[0];
    if let Some(e) = &chain.error {
        problems.push(format!("audit/records.jsonl: {e}"));
    } else if chain.starts_at == "unanchored" {
        problems.push(
            "audit/records.jsonl: starts neither at genesis nor at a signed checkpoint".to_owned(),
        );
    }
    match serde_json::from_slice::<Value>(&read("report.json").map_err(|e| vec![e])?) {
        Ok(stated) => {
            let rebuilt = serde_json::to_value(&rebuilt).unwrap_or_default();
            for part in ["totals", "denials", "models", "licences", "tenants"] {
                if stated[part] != rebuilt[part] {
                    problems.push(format!(
                        "report.json: its {part} do not match the audit records in the pack"
                    ));
                }
            }
        }
        Err(e) => problems.push(format!("report.json: {e}")),
    }

    // Bundles: named by their digest, signed by a trust anchor in the pack.
    let anchors = airgate_policy::bundle::verify::TrustAnchors::new(trust_of(dir));
    let mut bundles = 0;
    for rel in present.iter().filter(|p| p.starts_with("bundles/")) {
        bundles += 1;
        let token = std::fs::read(dir.join(rel)).unwrap_or_default();
        use sha2::Digest as _;
        let digest = hex(&sha2::Sha256::digest(token.trim_ascii()));
        if *rel != format!("bundles/{digest}.jwt") {
            problems.push(format!("{rel}: its digest is {digest}"));
            continue;
        }
        let aud = airgate_policy::bundle::verify::decode_unverified(&token)
            .map(|(_, w)| w.aud)
            .unwrap_or_default();
        if let Err(e) = airgate_policy::bundle::verify::verify_signed(&token, &anchors, &aud) {
            problems.push(format!("{rel}: {e}"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Checked {
        files: manifest.files.len(),
        records: chain.records,
        checkpoints: chain.signed_checkpoints,
        bundles,
        month_covered: chain.month_covered,
        host_key_sha256: fingerprint,
        host_key_from_pack: from_pack,
        host_key: key.raw,
        info,
    })
}

fn trust_of(dir: &Path) -> Vec<airgate_policy::bundle::verify::TrustAnchor> {
    let mut anchors = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("trust")) {
        for e in entries.flatten() {
            let path = e.path();
            let Some(kid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pub"))
            else {
                continue;
            };
            if let Ok(k) = crate::keys::read_public_key(&path) {
                anchors.push(k.anchor(kid));
            }
        }
    }
    anchors
}

/// Report inputs from opened packs: (directory, pack.json, host key).
fn pack_inputs(packs: &[(PathBuf, PackInfo, Vec<u8>)]) -> Inputs {
    let mut hosts = Vec::new();
    let mut dirs = Vec::new();
    let mut anchors = Vec::new();
    for (dir, info, key) in packs {
        hosts.push(Host {
            label: format!(
                "host {} (evidence pack)",
                &info.host_key_sha256[..16.min(info.host_key_sha256.len())]
            ),
            records: Records::Lines(dir.join("audit/records.jsonl")),
            host_key: key.clone(),
            bundle_at_start: info.bundle_at_start.clone(),
        });
        dirs.push(dir.join("bundles"));
        anchors.extend(trust_of(dir));
    }
    let merged = airgate_policy::bundle::verify::TrustAnchors::new(anchors);
    Inputs {
        hosts,
        bundles: report::Bundles::new(dirs, Some(merged)),
        state: None,
        config: None,
    }
}

/// One report over several hosts' packs, each verified first; users are
/// counted once across hosts, so the packs must share the user secret.
pub fn merged_report(packs: &[PathBuf], month: Option<Month>, now: i64) -> Result<Report, String> {
    let mut opened = Vec::new();
    let mut checked = Vec::new();
    for p in packs {
        let o = open(p)?;
        let c = verify(&o.dir, None).map_err(|problems| {
            format!(
                "{} does not verify:\n  {}",
                p.display(),
                problems.join("\n  ")
            )
        })?;
        checked.push((o.dir.clone(), c.info, c.host_key));
        opened.push(o);
    }
    let first = checked.first().ok_or("no packs given")?;
    let month = match month {
        Some(m) => m,
        None => Month::parse(&first.1.month)?,
    };
    for (dir, info, _) in &checked {
        if info.month != month.name() {
            return Err(format!(
                "{}: a pack of {}, not {}",
                dir.display(),
                info.month,
                month.name()
            ));
        }
        if info.user_secret_fingerprint != first.1.user_secret_fingerprint
            || info.user_secret_fingerprint.is_none()
        {
            return Err(format!(
                "{}: made with a different user-hashing secret than {}: the same user would count once per host (give the fleet one [audit] user_secret)",
                dir.display(),
                first.0.display()
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (dir, info, _) in &checked {
        if !seen.insert(info.host_key_sha256.clone()) {
            return Err(format!(
                "{}: a second pack of host {}: give one pack per host",
                dir.display(),
                info.host_key_sha256
            ));
        }
    }
    let mut inputs = pack_inputs(&checked);
    let report = report::build(month, &mut inputs, now);
    drop(opened);
    report
}
