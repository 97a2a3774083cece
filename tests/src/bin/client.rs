//! `airgate-test-client SOCKET PATH`: one GET over a Unix socket, printing
//! the status code on the first line and the body after it. The end-to-end
//! tests run it as other users (setpriv) to show what non-root callers see.
//!
//! `airgate-test-client SOCKET PATH BODY`: one POST of the JSON `BODY`; the
//! status code on the first line, then every server-sent event line
//! (`data: ...`) as it arrives, prefixed with the Unix time in milliseconds,
//! so tests can order events across several clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, socket, path] => get(socket, path),
        [_, socket, path, body] => post_stream(socket, path, body),
        _ => {
            eprintln!("usage: airgate-test-client SOCKET PATH [BODY]");
            ExitCode::from(2)
        }
    }
}

fn get(socket: &str, path: &str) -> ExitCode {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    match airgate_tests::raw_request(&PathBuf::from(socket), request.as_bytes()) {
        Ok(r) => {
            println!("{}", r.status);
            println!("{}", r.text());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("airgate-test-client: {e}");
            ExitCode::from(1)
        }
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn post_stream(socket: &str, path: &str, body: &str) -> ExitCode {
    let run = || -> std::io::Result<()> {
        let mut stream = UnixStream::connect(socket)?;
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = std::io::stdout().lock();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut headers_done = false;
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if !headers_done {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head.split(' ').nth(1).unwrap_or("0");
                writeln!(out, "{status}")?;
                buf.drain(..end + 4);
                headers_done = true;
            }
            // Whole lines only; chunk-size lines never start with "data: ".
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if line.starts_with("data: ") || line.starts_with('{') {
                    writeln!(out, "{} {line}", now_ms())?;
                    out.flush()?;
                }
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airgate-test-client: {e}");
            ExitCode::from(1)
        }
    }
}
