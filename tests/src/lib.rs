//! Support for airgate's end-to-end tests: start the real `airgate` binary on
//! a temporary Unix socket, talk raw HTTP to it, listen on a NOTIFY_SOCKET.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The airgate binary under test: `AIRGATE_BIN`, else the one cargo built
/// next to this test executable (target/<profile>/airgate).
pub fn airgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("airgate");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Parses one HTTP/1.1 response from raw bytes read until EOF.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The first response in `raw` once all of it (head and Content-Length body)
/// has arrived; None while more is to come.
pub fn complete_response(raw: &[u8]) -> Option<Response> {
    let r = parse_response(raw).ok()?;
    let want: usize = r
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    (r.body.len() >= want).then_some(r)
}

/// Sends raw request bytes and reads the response until the server closes.
///
/// A server may answer and close before it has read the whole request (a
/// refused connection, a 413 or 431): then writing fails with EPIPE and, on a
/// Unix socket, reading ends in ECONNRESET after the response. Both are fine
/// as long as a response arrived.
pub fn raw_request(socket: &Path, request: &[u8]) -> std::io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    // Generous: a generation on a loaded 2-core machine can take seconds.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let write_error = stream.write_all(request).err();
    let raw = read_until_close(&mut stream)?;
    if raw.is_empty()
        && let Some(e) = write_error
    {
        return Err(e);
    }
    parse_response(&raw).map_err(std::io::Error::other)
}

/// Reads until EOF; a reset after some data counts as the end.
pub fn read_until_close(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {
                return Ok(raw);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `GET path` with extra headers, `Connection: close`.
pub fn get(socket: &Path, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw_request(socket, req.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `POST path` with a JSON body.
pub fn post_json(socket: &Path, path: &str, body: &str) -> Response {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(socket, req.as_bytes()).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Self { path, socket }
    }

    /// The next message, or None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        // sd_notify ends every message with a newline.
        Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
    }

    /// Every message that arrives within `window`, with its arrival time.
    pub fn collect(&self, window: Duration) -> Vec<(Duration, String)> {
        let start = Instant::now();
        let mut out = Vec::new();
        while let Some(left) = window.checked_sub(start.elapsed()) {
            if left.is_zero() {
                break;
            }
            if let Some(m) = self.recv(left) {
                out.push((start.elapsed(), m));
            }
        }
        out
    }

    /// Waits for a message containing `needle`, returning everything seen up to it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < timeout {
            if let Some(m) = self.recv(
                timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1)),
            ) {
                let done = m.lines().any(|l| l == needle);
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {needle:?} within {timeout:?}; saw {seen:?}");
    }
}

/// A temporary directory holding a config, a socket and a state directory.
pub struct Sandbox {
    pub dir: TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("airgate-e2e-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("airgate.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("airgate.toml")
    }

    /// A configuration with this sandbox's paths; `extra` is appended (and
    /// may add keys to `[listen.unix]` right after it via `unix_extra`).
    /// It trusts this sandbox's policy authority (see [`Sandbox::sign`]) and
    /// polls the inbox every 100 ms.
    pub fn config(&self, unix_extra: &str, extra: &str) -> String {
        format!(
            "state_dir = \"{state}\"\nstate_probe_interval = \"200ms\"\nshutdown_grace = \"10s\"\n\n[listen.unix]\npath = \"{sock}\"\n{unix_extra}\n\n[log]\ntarget = \"stderr\"\nlevel = \"airgate=debug,info\"\n\n[trust]\nanchors = [{{ key_id = \"{KEY_ID}\", public_key = \"{key}\" }}]\n\n[audit]\nmarker = \"{marker}\"\n\n[policy]\naudience = \"{AUDIENCE}\"\npoll_interval = \"100ms\"\n\n{extra}\n",
            marker = self.path().join("marker/audit-store").display(),
            state = self.path().join("state").display(),
            sock = self.socket().display(),
            key = self.authority().join(format!("{KEY_ID}.pub")).display(),
        )
    }

    /// The policy authority's key directory, made with `airgate keygen` on first use.
    pub fn authority(&self) -> PathBuf {
        let dir = self.path().join("authority");
        if !dir.join(format!("{KEY_ID}.key")).exists() {
            run_ok(
                Command::new(airgate_bin())
                    .args(["keygen", "--dir"])
                    .arg(&dir)
                    .args(["--name", KEY_ID]),
            );
        }
        dir
    }

    /// Signs a policy (TOML) with `airgate bundle sign`; returns the bundle file.
    pub fn sign(&self, name: &str, policy: &str) -> PathBuf {
        let dir = self.path().join("policies");
        std::fs::create_dir_all(&dir).expect("policies dir");
        let source = dir.join(format!("{name}.toml"));
        std::fs::write(&source, policy).expect("write policy");
        let out = dir.join(format!("{name}.jwt"));
        run_ok(
            Command::new(airgate_bin())
                .args(["bundle", "sign", "--key"])
                .arg(self.authority().join(format!("{KEY_ID}.key")))
                .arg(&source)
                .arg("-o")
                .arg(&out),
        );
        out
    }

    pub fn inbox(&self) -> PathBuf {
        self.path().join("state").join("inbox")
    }

    /// Drops a bundle into the inbox the way a file sync should: written
    /// aside, then renamed in.
    pub fn publish(&self, bundle: &Path) {
        let inbox = self.inbox();
        std::fs::create_dir_all(&inbox).expect("inbox");
        let name = bundle.file_name().expect("file name");
        let tmp = inbox.join(format!(".{}.tmp", name.to_string_lossy()));
        std::fs::copy(bundle, &tmp).expect("copy bundle");
        std::fs::rename(&tmp, inbox.join(name)).expect("rename bundle");
    }

    /// Every audit record, as `airgate audit export --config` gives them:
    /// through the running daemon's admin socket, or from the stopped store.
    pub fn export(&self) -> Vec<serde_json::Value> {
        let out = Command::new(airgate_bin())
            .args(["audit", "export", "--config"])
            .arg(self.config_path())
            .output()
            .expect("airgate audit export");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.config_path();
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// The key id of a sandbox's policy authority.
pub const KEY_ID: &str = "e2e-authority";
/// The audience sandboxes are configured as.
pub const AUDIENCE: &str = "e2e-site";

/// A policy of `version` for the test site: the Gemma GGUF model under its
/// custom terms and the MiniLM ONNX model under Apache-2.0, and `tenants`
/// (TOML `[[tenants]]` tables).
pub fn policy(version: u64, tenants: &str) -> String {
    format!(
        r#"schema = 1
bundle_version = {version}
iss = "e2e-authority"
aud = "{AUDIENCE}"

[[licences]]
id = "LicenseRef-Gemma-Terms-of-Use"
name = "Gemma Terms of Use"
commercial_use = true
prohibited_uses = ["weapons-development"]
attribution = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
review_by = "2030-01-01"
after_review = "flag"

[[licences]]
id = "Apache-2.0"
name = "Apache License 2.0"
commercial_use = true
review_by = "2030-01-01"
after_review = "flag"

[[models]]
id = "gemma-3-270m"
format = "gguf"
kinds = ["chat", "completion"]
licence = "LicenseRef-Gemma-Terms-of-Use"
files = [{{ role = "weights", name = "gemma-3-270m-q4_k_m.gguf", sha256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" }}]

[[models]]
id = "paraphrase-minilm-l3"
format = "onnx"
kinds = ["embedding", "tensor"]
licence = "Apache-2.0"
files = [
  {{ role = "weights", name = "paraphrase-MiniLM-L3-v2.onnx", sha256 = "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16" }},
  {{ role = "tokenizer", name = "minilm-tokenizer.json", sha256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037" }},
]

{tenants}
"#
    )
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run airgate");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `airgate serve`, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `airgate serve` with `config` and waits until /healthz answers.
    pub fn start(sandbox: &Sandbox, config: &str, env: &[(&str, &str)]) -> Self {
        let daemon = Self::spawn(sandbox, config, env, Command::new(airgate_bin()));
        daemon.wait_healthy();
        daemon
    }

    /// Spawns `cmd serve --config ...` without waiting; `cmd` may be a wrapper.
    pub fn spawn(sandbox: &Sandbox, config: &str, env: &[(&str, &str)], mut cmd: Command) -> Self {
        let config_path = sandbox.write_config(config);
        let stderr_path = sandbox.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log");
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn airgate");
        Self {
            child,
            socket: sandbox.socket(),
            stderr_path,
        }
    }

    pub fn wait_healthy(&self) {
        let start = Instant::now();
        loop {
            let probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            if raw_request(&self.socket, probe).is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon not healthy in time; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until /readyz reports bundle `version` in force; returns /readyz.
    pub fn wait_bundle(&self, version: u64) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let r = get(&self.socket, "/readyz", &[]).json();
            if r["bundle"]["version"] == version {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "bundle version {version} not in force: {r}\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).expect("kill");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "daemon did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mutual-TLS client for the tests, built on rustls with the ring provider.
pub mod tls {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::client::TlsStream;

    use super::{Response, parse_response};

    /// Client configuration; keeps its session cache, so a second connection
    /// with the same client tries to resume.
    #[derive(Clone)]
    pub struct Client {
        pub config: Arc<rustls::ClientConfig>,
    }

    pub fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .expect("read PEM")
            .collect::<Result<_, _>>()
            .expect("parse PEM")
    }

    pub fn pem_key(path: &Path) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(path).expect("read key")
    }

    impl Client {
        /// Trusts `ca` for the server; presents `identity` (chain, key) if given.
        pub fn new(
            ca: &Path,
            identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        ) -> Self {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(ca) {
                roots.add(c).expect("add root");
            }
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
            let mut config = match identity {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain, key)
                    .expect("client cert"),
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Self {
                config: Arc::new(config),
            }
        }

        /// A client presenting the certificate and key files `prefix.pem` / `prefix.key`.
        pub fn with_files(ca: &Path, cert: &Path, key: &Path) -> Self {
            Self::new(ca, Some((pem_certs(cert), pem_key(key))))
        }

        pub async fn connect(
            &self,
            addr: SocketAddr,
        ) -> Result<TlsStream<tokio::net::TcpStream>, String> {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())
        }

        /// One GET on a fresh connection. With TLS 1.3 a refused client
        /// certificate surfaces after the client's side of the handshake, so
        /// "refused" means: no connection, or no response on it.
        pub async fn get(
            &self,
            addr: SocketAddr,
            path: &str,
        ) -> Result<(Response, Handshake), String> {
            let mut stream = self.connect(addr).await?;
            let handshake = Handshake::of(&stream);
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut raw = Vec::new();
            match stream.read_to_end(&mut raw).await {
                Ok(_) => {}
                Err(e) if raw.is_empty() => return Err(e.to_string()),
                Err(_) => {}
            }
            parse_response(&raw).map(|r| (r, handshake))
        }
    }

    /// What the client saw of a completed handshake.
    #[derive(Debug, Clone)]
    pub struct Handshake {
        pub resumed: bool,
        pub server_cert_sha256: String,
    }

    impl Handshake {
        pub fn of(stream: &TlsStream<tokio::net::TcpStream>) -> Self {
            let conn = stream.get_ref().1;
            let cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .expect("server cert");
            Self {
                resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                server_cert_sha256: super::sha256_hex(cert),
            }
        }
    }

    /// Sends a keep-alive GET on an open connection and reads one response.
    pub async fn keepalive_get(
        stream: &mut TlsStream<tokio::net::TcpStream>,
        path: &str,
    ) -> Result<Response, String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed after {} bytes", raw.len()));
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(r) = super::complete_response(&raw) {
                return Ok(r);
            }
        }
    }
}

/// SHA-256 of bytes, lower-case hex (matches the daemon's certificate fingerprints).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The directory holding the test models, fetched (once, then cached) by
/// `scripts/fetch-models`: the Gemma GGUF and the MiniLM ONNX file.
/// The Python interpreter of the pinned test environment
/// (scripts/setup-python: openai, tritonclient, onnx, cyclonedx).
pub fn python() -> String {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/setup-python"
        ))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/setup-python");
    assert!(out.status.success(), "scripts/setup-python failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("interpreter")
        .trim()
        .to_owned()
}

pub fn models_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-models");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/fetch-models");
        assert!(out.status.success(), "scripts/fetch-models failed");
        let text = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(text.lines().last().expect("the models directory").trim())
    })
    .clone()
}

/// Waits until /readyz says `model` is ready; returns /readyz.
pub fn wait_model(daemon: &Daemon, model: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let r = get(&daemon.socket, "/readyz", &[]).json();
        let state = &r["models"][model]["state"];
        if state == "ready" {
            return r;
        }
        assert!(
            state != "refused" && start.elapsed() < Duration::from_secs(60),
            "model {model} not ready: {r}\nstderr:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
