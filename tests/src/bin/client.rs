//! `airgate-test-client SOCKET PATH`: one GET over a Unix socket, printing
//! the status code on the first line and the body after it. The end-to-end
//! tests run it as other users (setpriv) to show what non-root callers see.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, path] = args.as_slice() else {
        eprintln!("usage: airgate-test-client SOCKET PATH");
        return ExitCode::from(2);
    };
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
