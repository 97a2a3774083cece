//! A minimal HTTP/1.1 client over the daemon's Unix socket, for the operator
//! commands (`airgate status`).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends `GET path` and returns the status and body.
pub async fn get(socket: &Path, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
    request(socket, http::Method::GET, path)
        .await
        .map(|(s, _, b)| (s, b))
}

/// Sends a bodiless request; returns status, headers and body.
pub async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes), ClientError> {
    let timeout = Duration::from_secs(10);
    tokio::time::timeout(timeout, async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(req).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, headers, body))
    })
    .await
    .map_err(|_| ClientError::Timeout(timeout))?
}
