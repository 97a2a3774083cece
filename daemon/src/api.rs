//! The HTTP API on every listener: routing, the request id, operator checks,
//! body limits, and the one mapping from request-path errors to HTTP.
//!
//! Handlers never see raw bytes they did not ask for: bodies are read through
//! the body bounds (size, deadline, the daemon-wide budget; see `body`) and
//! parsed once, here at the edge.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tracing::Instrument;

use airgate_policy::audit::Event;
use airgate_policy::bundle::Kind;
use airgate_policy::decision::Reason;
use airgate_policy::identity::Identity;

use crate::body::{BodyError, Buffered};
use crate::connection::{Conn, InFlight};
use crate::gate;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::request_id::{self, RequestId};
use crate::server::Shared;

/// A response body that keeps its request counted as in flight until the
/// body has been sent (or dropped), so idle detection and draining see
/// streaming responses too.
pub struct ResponseBody {
    inner: Inner,
    _in_flight: Option<InFlight>,
}

enum Inner {
    Full(Full<Bytes>),
    /// Server-sent events: chunks as they come; dropping the receiver (the
    /// client went away) tells the producer to stop.
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl ResponseBody {
    fn new(bytes: impl Into<Bytes>) -> Self {
        Self {
            inner: Inner::Full(Full::new(bytes.into())),
            _in_flight: None,
        }
    }

    fn stream(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        Self {
            inner: Inner::Stream(rx),
            _in_flight: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().inner {
            Inner::Full(f) => Pin::new(f).poll_frame(cx),
            Inner::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(f) => f.is_end_stream(),
            Inner::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(f) => f.size_hint(),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

/// Everything that can go wrong on the request path, as facts.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("operators only: connect as uid 0 or as a member of a configured admin group")]
    NotOperator,
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("content-type must be application/json")]
    NotJson,
    #[error("not serving inference: {0}")]
    NotServing(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("denied by policy ({}): {rule}", reason.code())]
    Denied {
        reason: Reason,
        rule: String,
        retry_after: Option<u64>,
    },
    #[error("model {model:?} is allowed but not loaded on this host{}", why.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    ModelNotLoaded { model: String, why: Option<String> },
    #[error("{0}")]
    InvalidParam(#[from] crate::openai::ParamError),
    #[error(
        "the prompt is {tokens} tokens; this model's context holds {context} per request (prompt plus completion)"
    )]
    ContextExceeded { tokens: usize, context: u32 },
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A run bigger than this server runs at once (batch × sequence, or
    /// the activation estimate); the request must shrink, not be retried.
    #[error("{0}")]
    TooLarge(#[from] crate::onnx::TooLarge),
    #[error("the model failed: {0}")]
    Engine(String),
    #[error("not serving: the audit record could not be made durable ({0})")]
    AuditUnavailable(String),
    /// The connection's client certificate has expired since its handshake
    /// (a long connection, a resumed session): nothing is routed, and the
    /// connection is closed.
    #[error(
        "the client certificate expired at {not_after} (Unix time); connect again with a valid one"
    )]
    ClientCertificateExpired { not_after: i64 },
}

impl From<crate::openai::RequestError> for ApiError {
    fn from(e: crate::openai::RequestError) -> Self {
        match e {
            crate::openai::RequestError::Malformed(m) => Self::BadRequest(m),
            crate::openai::RequestError::Param(p) => Self::InvalidParam(p),
        }
    }
}

impl From<gate::Refused> for ApiError {
    fn from(r: gate::Refused) -> Self {
        match r {
            gate::Refused::NoPolicy(why) => Self::NotServing(why),
            gate::Refused::BadRequest(why) => Self::BadRequest(why),
            gate::Refused::Denied { deny, retry_after } => Self::Denied {
                reason: deny.reason,
                rule: deny.rule,
                retry_after,
            },
        }
    }
}

impl ApiError {
    /// The one place request-path errors become HTTP.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::NotOperator => (StatusCode::FORBIDDEN, "not_operator"),
            Self::Body(BodyError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            // Larger than every body together may be: no retry can succeed.
            Self::Body(BodyError::OverBudget { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_over_budget")
            }
            Self::Body(BodyError::Busy) => (StatusCode::SERVICE_UNAVAILABLE, "body_budget_busy"),
            Self::Body(BodyError::Timeout { .. }) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::Body(BodyError::Read(_)) => (StatusCode::BAD_REQUEST, "body_read_error"),
            Self::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            Self::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::NotServing(_) => (StatusCode::SERVICE_UNAVAILABLE, "policy_unavailable"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            // OpenAI's code for a model that does not exist; the policy
            // reason is in `reason` and in the audit record.
            Self::Denied {
                reason: Reason::ModelNotInManifest,
                ..
            } => (StatusCode::NOT_FOUND, "model_not_found"),
            Self::Denied { reason, .. } => (denial_status(*reason), reason.code()),
            Self::ModelNotLoaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "model_not_loaded"),
            Self::InvalidParam(_) => (StatusCode::BAD_REQUEST, "invalid_parameter"),
            Self::ContextExceeded { .. } => (StatusCode::BAD_REQUEST, "context_length_exceeded"),
            Self::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
            Self::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "engine_error"),
            Self::AuditUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            Self::ClientCertificateExpired { .. } => {
                (StatusCode::UNAUTHORIZED, "client_certificate_expired")
            }
        }
    }

    /// The Open Inference Protocol's error shape: `{"error": "..."}`, with
    /// the same status and headers as the OpenAI-shaped answer.
    fn into_kserve_response(self) -> Response<ResponseBody> {
        let (_, code) = self.status_and_code();
        let message = format!("{self} ({code})");
        // Status and headers (Retry-After, Allow) as the OpenAI-shaped answer has them.
        let mut response = self.into_response(Version::HTTP_11);
        let mut body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
        body.push(b'\n');
        *response.body_mut() = ResponseBody::new(body);
        response
    }

    fn into_response(self, version: Version) -> Response<ResponseBody> {
        let (status, code) = self.status_and_code();
        let kind = match &self {
            Self::Denied { .. } => "policy_denied",
            _ if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let param = match &self {
            Self::InvalidParam(p) => Some(p.param),
            Self::ContextExceeded { .. } => Some("messages"),
            _ => None,
        };
        let mut error =
            json!({"message": self.to_string(), "type": kind, "param": param, "code": code});
        if let Self::Denied { rule, reason, .. } = &self {
            error["rule"] = json!(rule);
            error["reason"] = json!(reason.code());
        }
        let mut response = json_response(status, &json!({ "error": error }));
        match self {
            Self::Denied {
                retry_after: Some(secs),
                ..
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::MethodNotAllowed { allow, .. } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of a refused body is never read: tell an HTTP/1 client
            // the connection ends here (HTTP/2 resets just the stream).
            Self::Body(e) if version < Version::HTTP_2 => {
                let headers = response.headers_mut();
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                if matches!(e, BodyError::Busy) {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
            }
            Self::Body(BodyError::Busy) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The connection ends here (HTTP/2 peers see it go away).
            Self::ClientCertificateExpired { .. } if version < Version::HTTP_2 => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// The HTTP status of each policy denial (the table in README.md): 429 when
/// a retry can succeed later, 404 for a model the bundle does not know, 400
/// when the request itself must change, 403 when this caller may not.
fn denial_status(reason: Reason) -> StatusCode {
    match reason {
        r if r.is_transient() => StatusCode::TOO_MANY_REQUESTS,
        // The guard could not answer: fail closed, but say it may pass later.
        Reason::GuardUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        Reason::ModelNotInManifest => StatusCode::NOT_FOUND,
        Reason::ModelKindMismatch
        | Reason::UserRequired
        | Reason::PromptTooLong
        | Reason::MaxTokensExceeded => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(ResponseBody::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Route templates: the only values the `route` metric label takes.
fn route_of(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/admin/status" => "/admin/status",
        "/admin/audit/records" => "/admin/audit/records",
        "/admin/audit/snapshot" => "/admin/audit/snapshot",
        "/admin/usage" => "/admin/usage",
        "/admin/usage/rebuild" => "/admin/usage/rebuild",
        "/v1/whoami" => "/v1/whoami",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v2" => "/v2",
        "/v2/health/live" => "/v2/health/live",
        "/v2/health/ready" => "/v2/health/ready",
        p if p.starts_with("/v2/models/") => match kserve_route(p) {
            Some((_, KserveRoute::Metadata)) => "/v2/models/{name}",
            Some((_, KserveRoute::Ready)) => "/v2/models/{name}/ready",
            Some((_, KserveRoute::Infer)) => "/v2/models/{name}/infer",
            None => "unmatched",
        },
        _ => "unmatched",
    }
}

/// Entry point for every request on every listener.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let (id, origin) = RequestId::from_headers(req.headers());
    let route = route_of(req.uri().path());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        conn = conn.id,
    );
    async move {
        tracing::debug!(id_origin = ?origin, "request");
        let version = req.version();
        let answered = match check_peer(&shared, &conn) {
            Ok(()) => dispatch(&shared, &conn, &id, req).await,
            Err(e) => Err(e),
        };
        let mut response = match answered {
            Ok(r) => r,
            Err(e) => {
                let status = e.status_and_code().0;
                if status.is_server_error() {
                    tracing::warn!(status = status.as_u16(), error = %e, "request failed");
                } else {
                    tracing::info!(status = status.as_u16(), error = %e, "request refused");
                }
                e.into_response(version)
            }
        };
        if let Ok(v) = HeaderValue::from_str(id.as_str()) {
            response.headers_mut().insert(request_id::HEADER, v);
        }
        response.body_mut()._in_flight = Some(in_flight);
        let status = response.status().as_u16();
        shared
            .metrics
            .requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        shared
            .metrics
            .request_duration
            .get_or_create(&RouteLabels { route })
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "response"
        );
        response
    }
    .instrument(span)
    .await
}

/// Refuses a request whose connection's client certificate has expired
/// since the handshake (by the daemon's clock, the time floor included),
/// and asks for the connection to be closed. A long-lived connection, or a
/// session resumed from before the expiry, does not outlive the certificate.
fn check_peer(shared: &Shared, conn: &Conn) -> Result<(), ApiError> {
    let Identity::Tls(peer) = &conn.identity else {
        return Ok(());
    };
    let now = shared.policy.now().seconds();
    if !crate::tls::client_certificate_expired(peer.not_after, now) {
        return Ok(());
    }
    shared
        .metrics
        .tls_client_certificate_expired
        .get_or_create(&crate::metrics::ListenerLabels {
            listener: conn.listener.clone(),
        })
        .inc();
    tracing::warn!(
        AIRGATE_EVENT = "client_certificate_expired",
        serial = %peer.serial,
        not_after = peer.not_after,
        now,
        remote = %peer.remote_addr,
        "the connection's client certificate has expired: request refused, connection closed"
    );
    conn.close.cancel();
    Err(ApiError::ClientCertificateExpired {
        not_after: peer.not_after,
    })
}

async fn dispatch(
    shared: &Arc<Shared>,
    conn: &Conn,
    id: &RequestId,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let allow = |allow: &'static str| ApiError::MethodNotAllowed {
        method: method.clone(),
        path: path.clone(),
        allow,
    };
    match (path.as_str(), &method) {
        ("/healthz", &Method::GET) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ("/readyz", &Method::GET) => {
            let (reasons, warnings) = shared.health();
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let bundle = shared.policy.active().map(|a| {
                json!({
                    "version": a.version(),
                    "digest": a.verified.digest,
                    "expires": a.verified.bundle.expires,
                })
            });
            Ok(json_response(
                status,
                &json!({
                    "ready": reasons.is_empty(),
                    "reasons": reasons,
                    "warnings": warnings,
                    "models": shared.models.states(),
                    "bundle": bundle,
                }),
            ))
        }
        ("/v1/whoami", &Method::GET) => {
            Ok(json_response(StatusCode::OK, &whoami(shared, conn, id)))
        }
        ("/metrics", &Method::GET) => {
            require_operator(shared, conn)?;
            let mut response = Response::new(ResponseBody::new(shared.metrics.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(response)
        }
        ("/admin/status", &Method::GET) => {
            require_operator(shared, conn)?;
            Ok(json_response(StatusCode::OK, &shared.status()))
        }
        ("/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", &Method::POST) => {
            let kind = match path.as_str() {
                "/v1/chat/completions" => Kind::Chat,
                "/v1/completions" => Kind::Completion,
                _ => Kind::Embedding,
            };
            let headers = req.headers().clone();
            // The body is read and parsed before policy, so a malformed
            // request gets its own clear error whatever the policy state.
            let body = read_json_body(shared, req).await?;
            let request = crate::openai::parse_request(kind, &body)?;
            // Everything the model needs has been taken from the parsed body:
            // its charge on the body budget ends here, not with the generation.
            drop(body);
            let mut ask = gate::Ask::from_request(kind, &request);
            let started = Instant::now();
            let decided = gate::admit(shared, conn, id.as_str(), route_of(&path), &headers, &ask)?;
            // The guard scores in the decision's own task: a client gone
            // mid-scoring still leaves its decision record.
            let guarded = Some((conn.identity.clone(), std::mem::take(&mut ask.prompt)));
            let admitted =
                durable_decision(shared, id, ask.model, decided, started, guarded).await?;
            tracing::info!(
                tenant = %admitted.allow.tenant,
                model = %admitted.allow.model,
                purpose = %admitted.allow.purpose,
                bundle_version = admitted.bundle.version(),
                "request allowed by policy"
            );
            // A truncating budget grants a total: the prompt as the model
            // counts it and the generation must fit in it.
            let budget = admitted
                .served
                .reservation()
                .filter(|r| r.truncate && r.tokens_per_day.is_some())
                .map(|r| r.tokens);
            let served = admitted.served;
            match request.work {
                crate::openai::Work::Generate(g) => {
                    generate_text(
                        shared,
                        id,
                        served,
                        Granted {
                            bundle: admitted.bundle,
                            allow: admitted.allow,
                            max_tokens: admitted.max_tokens,
                            budget,
                        },
                        g,
                    )
                    .await
                }
                crate::openai::Work::Embed(e) => {
                    embeddings(shared, served, &admitted.allow.model, e).await
                }
            }
        }
        ("/v1/models", &Method::GET) => Ok(json_response(StatusCode::OK, &models(shared, conn))),
        ("/admin/audit/records", &Method::GET) => {
            require_operator(shared, conn)?;
            let query = req.uri().query().unwrap_or("");
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_owned())
            };
            let number = |name: &str, default: u64| match param(name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| ApiError::BadRequest(format!("{name} must be a number"))),
            };
            let from = number("from", 0)?;
            let limit = usize::try_from(number("limit", 1000)?.clamp(1, 10_000)).unwrap_or(1000);
            // raw=1: the stored bytes (base64), for readers that verify the
            // chain themselves (reports, evidence packs).
            let (lines, next) = if param("raw").as_deref() == Some("1") {
                shared.audit.raw_page(from, limit).map(|(records, next)| {
                    let lines = records
                        .iter()
                        .map(|(seq, stored)| crate::report::raw_line(*seq, stored))
                        .collect();
                    (lines, next)
                })
            } else {
                shared.audit.page(from, limit)
            }
            .map_err(|e| ApiError::AuditUnavailable(e.to_string()))?;
            let mut body = lines.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            let mut response = Response::new(ResponseBody::new(body));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jsonl"),
            );
            headers.insert("x-airgate-next", HeaderValue::from(next));
            Ok(response)
        }
        ("/admin/audit/snapshot", &Method::POST) => {
            require_operator(shared, conn)?;
            let config = shared.config();
            let name = format!("audit-{}", crate::bundle::system_time_now());
            let dest = config.state_dir.join("snapshots").join(&name);
            let host_pub = config.state_dir.join("host.pub");
            let audit = shared.audit.clone();
            let d = dest.clone();
            let records = tokio::task::spawn_blocking(move || audit.snapshot(&d, &host_pub))
                .await
                .map_err(|e| ApiError::AuditUnavailable(e.to_string()))?
                .map_err(|e| ApiError::AuditUnavailable(e.to_string()))?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"path": dest.display().to_string(), "records": records}),
            ))
        }
        (p, _) if p == "/v2" || p.starts_with("/v2/") => Ok(kserve(shared, conn, id, req)
            .await
            .unwrap_or_else(ApiError::into_kserve_response)),
        ("/admin/usage", &Method::GET) => {
            require_operator(shared, conn)?;
            let month = match req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("month="))
            {
                None | Some("") => None,
                Some(m) => Some(crate::usage::parse_month(m).map_err(ApiError::BadRequest)?),
            };
            let usage = Arc::clone(&shared.admission);
            let bundle = shared.policy.active();
            let now = shared.policy.now();
            let report = tokio::task::spawn_blocking(move || {
                usage.report(month, bundle.as_ref().map(|b| &b.verified.bundle), now)
            })
            .await
            .map_err(|e| ApiError::AuditUnavailable(e.to_string()))?
            .map_err(ApiError::AuditUnavailable)?;
            Ok(json_response(StatusCode::OK, &report))
        }
        ("/admin/usage/rebuild", &Method::POST) => {
            require_operator(shared, conn)?;
            let usage = Arc::clone(&shared.admission);
            let now = shared.policy.now();
            let report = tokio::task::spawn_blocking(move || usage.rebuild(now))
                .await
                .map_err(|e| ApiError::AuditUnavailable(e.to_string()))?
                .map_err(ApiError::AuditUnavailable)?;
            Ok(json_response(StatusCode::OK, &report))
        }
        (
            "/healthz" | "/readyz" | "/v1/whoami" | "/v1/models" | "/metrics" | "/admin/status"
            | "/admin/usage",
            _,
        ) => Err(allow("GET")),
        ("/admin/usage/rebuild" | "/admin/audit/snapshot", _) => Err(allow("POST")),
        ("/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", _) => Err(allow("POST")),
        _ => Err(ApiError::NotFound { method, path }),
    }
}

/// A request whose allow is durable: what was granted, and the [`Served`]
/// that will close it.
struct Past {
    bundle: Arc<crate::bundle::Active>,
    allow: airgate_policy::decision::Allow,
    max_tokens: u32,
    served: Served,
}

/// Fail closed: nothing is answered, not even a denial, before the
/// decision record is durable. Returns the request past policy, or the
/// error to answer.
///
/// The record is made durable by a task of its own, which the client going
/// away does not cancel: an allow whose record reached the disk always gets
/// its completion (`cancelled`, if nobody waits for the answer any more),
/// and its reservation is released either way.
async fn durable_decision(
    shared: &Arc<Shared>,
    id: &RequestId,
    model: &str,
    decided: gate::Decided,
    started: Instant,
    guarded: Option<(Identity, String)>,
) -> Result<Past, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task_shared = Arc::clone(shared);
    let task_id = id.clone();
    // Tracked: the shutdown record waits for it (it may outlive its connection).
    shared.detached.spawn(async move {
        // The tenant's guard, if any, within its own timeout.
        let decided = match guarded {
            Some((identity, prompt)) => {
                gate::guard(&task_shared, &identity, decided, &prompt).await
            }
            None => decided,
        };
        let gate::Decided {
            record,
            outcome,
            unrecorded,
        } = decided;
        let durable = if unrecorded {
            task_shared.metrics.denials_unrecorded.inc();
            Ok(0)
        } else {
            task_shared
                .audit
                .append(Event::Decision(Box::new(record)))
                .await
        };
        let durable = match durable {
            Err(e) if task_shared.config().audit.fail_open => {
                tracing::warn!(
                    AIRGATE_EVENT = "audit_fail_open",
                    AIRGATE_REQUEST_ID = task_id.as_str(),
                    error = %e,
                    "serving WITHOUT a durable decision record (audit.fail_open)"
                );
                Ok(None)
            }
            other => other.map(Some),
        };
        if let Err((Ok(Some(seq)), Ok(admitted))) = tx.send((durable, outcome)) {
            Served::new(
                &task_shared,
                &task_id,
                admitted.reserved,
                Some(seq),
                started,
            )
            .finish(
                "cancelled",
                "the client went away before its decision was durable",
            );
        }
    });
    let (durable, outcome) = rx
        .await
        .map_err(|_| ApiError::AuditUnavailable("the audit task ended".to_owned()))?;
    match (outcome, durable) {
        // The reservation is released as the admission drops.
        (Ok(_), Err(e)) | (Err(_), Err(e)) => Err(ApiError::AuditUnavailable(e.to_string())),
        (Ok(a), Ok(seq)) => Ok(Past {
            bundle: a.bundle,
            allow: a.allow,
            max_tokens: a.max_tokens,
            served: Served::new(shared, id, a.reserved, seq, started),
        }),
        (Err(refused), Ok(_)) => {
            let e = ApiError::from(refused);
            if let ApiError::Denied { reason, rule, .. } = &e {
                tracing::warn!(
                    AIRGATE_EVENT = "denial",
                    AIRGATE_DECISION = "deny",
                    AIRGATE_REASON = reason.code(),
                    AIRGATE_MODEL = model,
                    AIRGATE_REQUEST_ID = id.as_str(),
                    rule = %rule,
                    "request denied by policy"
                );
            }
            Err(e)
        }
    }
}

/// A request past policy: the reservation it holds and what it has used.
/// Whatever way it ends (answered, failed, the client gone and the future
/// dropped), one completion record is written, naming its decision by the
/// decision record's sequence, and the reservation is committed with the
/// tokens actually processed, or released if none were.
struct Served {
    shared: Arc<Shared>,
    request_id: String,
    /// The decision record's audit sequence (none when it was not made
    /// durable, under `audit.fail_open`).
    decision_seq: Option<u64>,
    /// Set once the request reaches a model (for the token metrics).
    model: Option<String>,
    first_text: bool,
    reserved: Option<gate::Reserved>,
    started: Instant,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// Set when a result was produced that counts as served though it
    /// processed no tokens (a tensor inference).
    served: bool,
}

/// Longest completion detail kept in a record.
const MAX_DETAIL_BYTES: usize = 1024;

impl Served {
    fn new(
        shared: &Arc<Shared>,
        id: &RequestId,
        reserved: gate::Reserved,
        decision_seq: Option<u64>,
        started: Instant,
    ) -> Self {
        Self {
            shared: Arc::clone(shared),
            request_id: id.as_str().to_owned(),
            decision_seq,
            model: None,
            first_text: false,
            reserved: Some(reserved),
            started,
            prompt_tokens: 0,
            completion_tokens: 0,
            served: false,
        }
    }

    /// What admission reserved for the request.
    fn reservation(&self) -> Option<&airgate_policy::decision::Reservation> {
        self.reserved.as_ref().map(|r| &r.ticket().reservation)
    }

    fn finish(mut self, outcome: &'static str, detail: &str) {
        self.close(outcome, detail);
    }

    /// Text came back from the model: the first time, that is the time to first token.
    fn text(&mut self, generated: u32) {
        self.completion_tokens = generated;
        if !self.first_text {
            self.first_text = true;
            if let Some(model) = &self.model {
                self.shared
                    .metrics
                    .time_to_first_token
                    .get_or_create(&crate::metrics::ModelLabels {
                        model: model.clone(),
                    })
                    .observe(self.started.elapsed().as_secs_f64());
            }
        }
    }

    fn close(&mut self, outcome: &'static str, detail: &str) {
        let Some(reserved) = self.reserved.take() else {
            return;
        };
        if let Some(model) = &self.model {
            let m = &self.shared.metrics;
            for (kind, n) in [
                ("prompt", self.prompt_tokens),
                ("completion", self.completion_tokens),
            ] {
                m.tokens
                    .get_or_create(&crate::metrics::TokenLabels {
                        model: model.clone(),
                        kind,
                    })
                    .inc_by(u64::from(n));
            }
            m.generations
                .get_or_create(&crate::metrics::GenerationLabels {
                    model: model.clone(),
                    outcome,
                })
                .inc();
        }
        let used = u64::from(self.prompt_tokens) + u64::from(self.completion_tokens);
        let served = self.served || used > 0;
        if served {
            reserved.commit(used);
        } else {
            reserved.release();
        }
        self.shared.audit.record(Event::Completion {
            request_id: self.request_id.clone(),
            decision_seq: Some(self.decision_seq),
            outcome: outcome.to_owned(),
            detail: crate::bounded::clip(detail, MAX_DETAIL_BYTES).into_owned(),
            prompt_tokens: u64::from(self.prompt_tokens),
            completion_tokens: u64::from(self.completion_tokens),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            served: Some(served),
        });
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.close("cancelled", "the client went away");
    }
}

/// What policy granted a request.
struct Granted {
    bundle: Arc<crate::bundle::Active>,
    allow: airgate_policy::decision::Allow,
    max_tokens: u32,
    /// Tokens (prompt and generation) a truncating budget granted.
    budget: Option<u64>,
}

fn seconds_to_midnight(now: airgate_policy::time::UnixTime) -> u64 {
    u64::try_from(86_400 - now.seconds().rem_euclid(86_400)).unwrap_or(1)
}

/// `/v1/embeddings` on an ONNX sentence-embedding model with a tokenizer.
async fn embeddings(
    shared: &Arc<Shared>,
    mut served: Served,
    model: &str,
    request: crate::openai::Embeddings,
) -> Result<Response<ResponseBody>, ApiError> {
    let Some(engine) = shared.models.get_onnx(model) else {
        served.finish("error", "model not loaded");
        return Err(ApiError::ModelNotLoaded {
            model: model.to_owned(),
            why: shared
                .models
                .state(model)
                .map(|s| serde_json::to_string(&s).unwrap_or_default()),
        });
    };
    if engine.tokenizer.is_none() {
        served.finish("error", "no tokenizer");
        return Err(ApiError::BadRequest(format!(
            "model {model:?} has no tokenizer in the manifest: it takes tensors (/v2/models/{model}/infer), not text"
        )));
    }
    served.model = Some(model.to_owned());
    let embedded = match engine.embed(request.texts).await {
        Ok(e) => e,
        Err(crate::onnx::RunError::Overloaded(n)) => {
            let e = format!("{n} requests are running or waiting for model {model:?}");
            served.finish("error", &e);
            return Err(ApiError::Overloaded(e));
        }
        Err(crate::onnx::RunError::TooLarge(e)) => {
            served.finish("error", &e.to_string());
            return Err(ApiError::TooLarge(e));
        }
        Err(crate::onnx::RunError::Failed(e)) => {
            served.finish("error", &e);
            return Err(ApiError::Engine(e));
        }
    };
    served.prompt_tokens = u32::try_from(embedded.tokens).unwrap_or(u32::MAX);
    served.served = true;
    let data: Vec<serde_json::Value> = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if request.base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let doc = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens},
    });
    served.finish("completed", "");
    let mut bytes = serde_json::to_vec(&doc).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(ResponseBody::new(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Chat and text completions on a loaded GGUF model.
async fn generate_text(
    shared: &Arc<Shared>,
    id: &RequestId,
    mut served: Served,
    granted: Granted,
    g: crate::openai::Generate,
) -> Result<Response<ResponseBody>, ApiError> {
    use crate::llm::{Job, Out};
    let model = granted.allow.model.clone();
    let Some(engine) = shared.models.get(&model) else {
        let why = shared.models.state(&model).map(|s| match s {
            crate::llm::ModelState::Refused { reason } => reason,
            crate::llm::ModelState::Checking {
                done_bytes,
                total_bytes,
            } => format!(
                "checking its files ({} of {} MiB)",
                done_bytes >> 20,
                total_bytes >> 20
            ),
            crate::llm::ModelState::Loading => "loading".to_owned(),
            crate::llm::ModelState::Ready { .. } => "just unloaded".to_owned(),
        });
        served.finish("error", "model not loaded");
        return Err(ApiError::ModelNotLoaded { model, why });
    };
    // Templating and tokenizing a large prompt is CPU work: off the runtime.
    let prepared = {
        let engine = Arc::clone(&engine);
        let (kind, messages, prompt) = (g.kind, g.messages.clone(), g.prompt.clone());
        tokio::task::spawn_blocking(move || match kind {
            Kind::Chat => engine.chat_tokens(&messages),
            _ => Ok(engine.tokenize(&prompt)),
        })
        .await
        .unwrap_or_else(|e| Err(format!("tokenizing failed: {e}")))
    };
    let prompt = match prepared {
        Ok(p) => p,
        Err(e) => {
            served.finish("error", &e);
            return Err(ApiError::BadRequest(e));
        }
    };
    if prompt.len() >= engine.context as usize {
        served.finish("error", "prompt longer than the context");
        return Err(ApiError::ContextExceeded {
            tokens: prompt.len(),
            context: engine.context,
        });
    }
    let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    let mut max_tokens = granted.max_tokens;
    if let Some(budget) = granted.budget {
        let left = budget.saturating_sub(u64::from(prompt_tokens));
        if left == 0 {
            served.finish(
                "error",
                "the prompt alone exceeds what is left of the token budget",
            );
            return Err(ApiError::Denied {
                reason: Reason::TokenBudgetExhausted,
                rule: format!(
                    "limits.tokens_per_day: {budget} tokens left, the prompt is {prompt_tokens}"
                ),
                retry_after: Some(seconds_to_midnight(shared.policy.now())),
            });
        }
        max_tokens = max_tokens.min(u32::try_from(left).unwrap_or(u32::MAX));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        tenant: granted.allow.tenant.to_string(),
        prompt,
        sampling: g.sampling.clone(),
        max_tokens,
        stop: g.stop.clone(),
        out: tx,
    };
    if let Err(e) = engine.submit(job) {
        served.finish("error", &e.to_string());
        return Err(ApiError::Overloaded(e.to_string()));
    }
    served.prompt_tokens = prompt_tokens;
    served.model = Some(model.clone());
    let attribution: Vec<String> = granted
        .allow
        .obligations
        .iter()
        .filter_map(|o| match o {
            airgate_policy::decision::Obligation::Attribution { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect();
    let airgate = json!({
        "licences": granted.allow.licences,
        "attribution": attribution,
        "obligations": granted.allow.obligations,
        "bundle_version": granted.bundle.version(),
    });
    let created = crate::server::unix_now();
    let chat = g.kind == Kind::Chat;
    let request_id = id.as_str().to_owned();
    let mut response = if g.stream {
        let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let chunk = move |text: Option<&str>,
                          finish: Option<crate::llm::FinishReason>,
                          role: bool| {
            let choice = if chat {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            } else {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            };
            json!({
                "id": request_id,
                "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                "created": created,
                "model": model,
                "choices": [choice],
            })
        };
        let include_usage = g.include_usage;
        // Tracked: the shutdown record waits for its completion record.
        shared.detached.spawn(async move {
            let event = |mut v: serde_json::Value| {
                if include_usage && v.get("usage").is_none() {
                    v["usage"] = serde_json::Value::Null;
                }
                Bytes::from(format!("data: {v}\n\n"))
            };
            let mut first = chat;
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    () = body_tx.closed() => {
                        served.finish("cancelled", "the client disconnected mid-stream");
                        return;
                    }
                };
                match ev {
                    Some(Out::Started) => {}
                    Some(Out::Text(t, generated)) => {
                        served.text(generated);
                        let sent = body_tx.send(event(chunk(Some(&t), None, first))).await;
                        first = false;
                        if sent.is_err() {
                            served.finish("cancelled", "the client disconnected mid-stream");
                            return;
                        }
                    }
                    Some(Out::Done(f)) => {
                        served.completion_tokens = f.completion_tokens;
                        let mut last = chunk(None, Some(f.reason), first);
                        if chat && first {
                            last["choices"][0]["delta"]["content"] = json!("");
                        }
                        let _ = body_tx.send(event(last)).await;
                        if include_usage {
                            let mut u = chunk(None, None, false);
                            u["choices"] = json!([]);
                            u["usage"] = usage(&f);
                            let _ = body_tx.send(event(u)).await;
                        }
                        let _ = body_tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                        served.finish("completed", finish_name(f.reason));
                        return;
                    }
                    Some(Out::Failed(e)) => {
                        let err = json!({"error": {"message": format!("the model failed: {e}"), "type": "server_error", "param": null, "code": "engine_error"}});
                        let _ = body_tx.send(Bytes::from(format!("data: {err}\n\n"))).await;
                        served.finish("error", &e);
                        return;
                    }
                    None => {
                        served.finish("error", "the engine stopped");
                        return;
                    }
                }
            }
        });
        let mut r = Response::new(ResponseBody::stream(body_rx));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut text = String::new();
        let finish = loop {
            match rx.recv().await {
                Some(Out::Started) => {}
                Some(Out::Text(t, generated)) => {
                    served.text(generated);
                    text.push_str(&t);
                }
                Some(Out::Done(f)) => break f,
                Some(Out::Failed(e)) => {
                    served.finish("error", &e);
                    return Err(ApiError::Engine(e));
                }
                None => {
                    served.finish("error", "the engine stopped");
                    return Err(ApiError::Engine("the engine stopped".to_owned()));
                }
            }
        };
        served.completion_tokens = finish.completion_tokens;
        served.finish("completed", finish_name(finish.reason));
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.reason, "logprobs": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish.reason, "logprobs": null})
        };
        json_response(
            StatusCode::OK,
            &json!({
                "id": id.as_str(),
                "object": if chat { "chat.completion" } else { "text_completion" },
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage(&finish),
                "airgate": airgate,
            }),
        )
    };
    if !attribution.is_empty() {
        // Header values are visible ASCII: anything else is replaced.
        let text: String = attribution
            .join(" | ")
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&text) {
            response.headers_mut().insert("airgate-attribution", v);
        }
    }
    Ok(response)
}

fn usage(f: &crate::llm::Finish) -> serde_json::Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

fn finish_name(reason: crate::llm::FinishReason) -> &'static str {
    match reason {
        crate::llm::FinishReason::Stop => "stop",
        crate::llm::FinishReason::Length => "length",
    }
}

fn whoami(shared: &Shared, conn: &Conn, id: &RequestId) -> serde_json::Value {
    let active = shared.policy.active();
    let (tenant, tenant_error) = match &active {
        None => (None, Some("no policy bundle in force".to_owned())),
        Some(a) => match a.verified.bundle.tenant_map.resolve(&conn.identity) {
            Ok(t) => (a.verified.bundle.tenants.get(t), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    json!({
        "request_id": id.as_str(),
        "listener": conn.listener,
        "identity": conn.identity,
        "operator": shared.is_operator(&conn.identity),
        "tenant": tenant.map(|t| t.id.to_string()),
        "tenant_error": tenant_error,
        "bundle_version": active.as_ref().map(|a| a.version()),
        "purposes": tenant.map(|t| &t.purposes),
        "default_purpose": tenant.map(|t| &t.default_purpose),
        "models": tenant.map(|t| &t.models),
        "limits": tenant.map(|t| &t.limits),
    })
}

/// `GET /v1/models`: the models this caller's tenant may use, in OpenAI's shape.
fn models(shared: &Shared, conn: &Conn) -> serde_json::Value {
    let data: Vec<serde_json::Value> = shared
        .policy
        .active()
        .and_then(|a| {
            let b = &a.verified.bundle;
            let tenant = b.tenants.get(b.tenant_map.resolve(&conn.identity).ok()?)?;
            Some(
                tenant
                    .models
                    .iter()
                    .filter_map(|id| b.models.get(id))
                    .map(|m| {
                        json!({
                            "id": m.id,
                            "object": "model",
                            "created": b.issued_at,
                            "owned_by": "airgate",
                            "licence": m.licence,
                            "kinds": m.kinds,
                            "format": m.format,
                            "status": shared.models.state(&m.id),
                        })
                    })
                    .collect(),
            )
        })
        .unwrap_or_default();
    json!({"object": "list", "data": data})
}

fn require_operator(shared: &Shared, conn: &Conn) -> Result<(), ApiError> {
    if shared.is_operator(&conn.identity) {
        Ok(())
    } else {
        Err(ApiError::NotOperator)
    }
}

/// Reads a JSON body (see [`read_body`]) and parses it, charging the body
/// budget for the parsed document first: the charge lives as long as the
/// returned value.
async fn read_json_body(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Buffered<serde_json::Value>, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let mut bytes = read_body(shared, req).await?;
    if !is_json {
        return Err(ApiError::NotJson);
    }
    bytes.charge_json(bytes.len())?;
    bytes.try_map(|b| serde_json::from_slice(&b).map_err(|e| ApiError::InvalidJson(e.to_string())))
}

/// The whole body, under the configured body bounds. A declared
/// Content-Length over the limit is refused before a byte is read; a chunked
/// body is cut off as soon as it passes the limit; a body that does not keep
/// up `limits.min_upload_bytes_per_sec` is cut off `limits.body_read_timeout`
/// after its bytes were due.
async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Buffered<Bytes>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let config = shared.config();
    let limits = &config.limits;
    let rules = crate::body::Rules {
        limit: limits.max_body_bytes,
        timeout: limits.body_read_timeout,
        min_bytes_per_sec: limits.min_upload_bytes_per_sec,
    };
    Ok(crate::body::read(req.into_body(), declared, rules, &shared.bodies).await?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KserveRoute {
    Metadata,
    Ready,
    Infer,
}

/// `/v2/models/{name}[/versions/1][/ready|/infer]` -> (name, route).
fn kserve_route(path: &str) -> Option<(&str, KserveRoute)> {
    let rest = path.strip_prefix("/v2/models/")?;
    let mut parts: Vec<&str> = rest.split('/').collect();
    let route = match parts.last() {
        Some(&"ready") => KserveRoute::Ready,
        Some(&"infer") => KserveRoute::Infer,
        _ => KserveRoute::Metadata,
    };
    if route != KserveRoute::Metadata {
        parts.pop();
    }
    match parts[..] {
        [name] if !name.is_empty() => Some((name, route)),
        // Only version 1 exists: a model's files are fixed by its digests.
        [name, "versions", "1"] if !name.is_empty() => Some((name, route)),
        _ => None,
    }
}

/// The KServe v2 / Open Inference Protocol endpoints.
async fn kserve(
    shared: &Arc<Shared>,
    conn: &Conn,
    id: &RequestId,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let not_allowed = |allow: &'static str| ApiError::MethodNotAllowed {
        method: method.clone(),
        path: path.clone(),
        allow,
    };
    match path.as_str() {
        "/v2" if method == Method::GET => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"name": "airgate", "version": env!("CARGO_PKG_VERSION"),
                        "extensions": ["binary_tensor_data"]}),
            ));
        }
        "/v2/health/live" if method == Method::GET => {
            return Ok(json_response(StatusCode::OK, &json!({"live": true})));
        }
        "/v2/health/ready" if method == Method::GET => {
            let (reasons, _) = shared.health();
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Ok(json_response(
                status,
                &json!({"ready": reasons.is_empty(), "reasons": reasons}),
            ));
        }
        "/v2" | "/v2/health/live" | "/v2/health/ready" => return Err(not_allowed("GET")),
        _ => {}
    }
    let Some((name, route)) = kserve_route(&path) else {
        return Err(ApiError::NotFound { method, path });
    };
    let name = name.to_owned();
    match (route, &method) {
        (KserveRoute::Infer, &Method::POST) => {
            return kserve_infer(shared, conn, id, &name, req).await;
        }
        (KserveRoute::Infer, _) => return Err(not_allowed("POST")),
        (_, &Method::GET) => {}
        _ => return Err(not_allowed("GET")),
    }
    // Metadata and readiness: only for a model the caller's tenant may use.
    let config = shared.config();
    let bundle = shared
        .policy
        .in_force(config.policy.expiry_grace)
        .map_err(ApiError::NotServing)?;
    let b = &bundle.verified.bundle;
    let tenant = b
        .tenant_map
        .resolve(&conn.identity)
        .ok()
        .and_then(|t| b.tenants.get(t));
    if !b.models.contains_key(&name) {
        return Err(ApiError::NotFound { method, path });
    }
    if !tenant.is_some_and(|t| t.models.contains(&name)) {
        return Err(ApiError::Denied {
            reason: Reason::ModelNotAllowed,
            rule: format!("this caller's tenant may not use model {name:?}"),
            retry_after: None,
        });
    }
    let model = shared.models.get_onnx(&name);
    match (route, model) {
        (KserveRoute::Ready, Some(_)) => Ok(json_response(
            StatusCode::OK,
            &json!({"name": name, "ready": true}),
        )),
        (KserveRoute::Metadata, Some(m)) => Ok(json_response(
            StatusCode::OK,
            &crate::kserve::metadata(&name, &m.inputs, &m.outputs),
        )),
        (KserveRoute::Infer, Some(_)) => Err(ApiError::NotFound { method, path }),
        (_, None) => Err(ApiError::ModelNotLoaded {
            why: shared
                .models
                .state(&name)
                .map(|s| serde_json::to_string(&s).unwrap_or_default()),
            model: name,
        }),
    }
}

/// `POST /v2/models/{name}/infer`: decided, admitted, checked, audited, run.
///
/// Policy decides on what it needs (the model's name, the caller, the end
/// user) before the request is held to the model: its inputs, outputs and
/// whether it is loaded are only for callers allowed it. A denied or
/// unknown caller learns nothing of them, not even from a 400 naming an
/// input; its denial is answered once its record is durable, as always.
async fn kserve_infer(
    shared: &Arc<Shared>,
    conn: &Conn,
    id: &RequestId,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    use crate::kserve;
    let headers = req.headers().clone();
    let mut body = read_body(shared, req).await?;
    // The body's framing and the end user are read before policy: they say
    // nothing about the model.
    let header_length = headers
        .get(kserve::HEADER_LENGTH)
        .map(|v| v.to_str().unwrap_or("?"));
    // The JSON header is charged for its parsed form; the tensor tail is
    // bytes, and charged as such.
    let json_len = kserve::json_len(body.len(), header_length).map_err(ApiError::BadRequest)?;
    body.charge_json(json_len)?;
    let (doc, tail) = kserve::split_body(&body, header_length).map_err(ApiError::BadRequest)?;
    let user = kserve::user_of(&doc).map_err(ApiError::BadRequest)?;
    let ask = gate::Ask {
        kind: Kind::Tensor,
        model: name,
        prompt: String::new(),
        max_tokens: Some(1),
        openai_user: user.as_deref(),
    };
    let started = Instant::now();
    let decided = gate::admit(
        shared,
        conn,
        id.as_str(),
        "/v2/models/{name}/infer",
        &headers,
        &ask,
    )?;
    // Allowed: only now is the request held to the model.
    let ready = decided
        .outcome
        .is_ok()
        .then(|| kserve_tensors(shared, name, &doc, tail));
    let (model, checked) = match ready {
        Some(Ok(ready)) => ready,
        not_runnable => {
            // Denied: `durable_decision` answers with the denial alone.
            // Allowed but not runnable as sent (not loaded, inputs that do
            // not fit, too large): answered with why, and closed. Both once
            // the decision record is durable.
            let past = durable_decision(shared, id, name, decided, started, None).await?;
            let e = not_runnable.and_then(Result::err).unwrap_or_else(|| {
                ApiError::Engine("a request past policy was not checked".to_owned())
            });
            past.served.finish("error", &e.to_string());
            return Err(e);
        }
    };
    // An allowed request runs while its decision record is made durable;
    // nothing is answered before it is (fail closed), and a result whose
    // record failed is thrown away.
    let (admitted, ran) = tokio::join!(
        durable_decision(shared, id, name, decided, started, None),
        model.run(checked.tensors)
    );
    let mut served = admitted?.served;
    served.model = Some(name.to_owned());
    let outputs = match ran {
        Ok(o) => o,
        Err(crate::onnx::RunError::Overloaded(n)) => {
            let e = format!("{n} requests are running or waiting for model {name:?}");
            served.finish("error", &e);
            return Err(ApiError::Overloaded(e));
        }
        Err(crate::onnx::RunError::TooLarge(e)) => {
            served.finish("error", &e.to_string());
            return Err(ApiError::TooLarge(e));
        }
        Err(crate::onnx::RunError::Failed(e)) => {
            served.finish("error", &e);
            return Err(ApiError::Engine(e));
        }
    };
    let (doc, tail) = match kserve::encode(
        name,
        checked.id.as_deref(),
        &model.outputs,
        &outputs,
        &checked.outputs,
    ) {
        Ok(d) => d,
        Err(e) => {
            served.finish("error", &e);
            return Err(ApiError::Engine(e));
        }
    };
    served.served = true;
    served.finish("completed", "");
    // Compact: tensors are data, not for reading.
    let mut bytes = serde_json::to_vec(&doc).unwrap_or_default();
    let json_len = bytes.len();
    bytes.extend_from_slice(&tail);
    let mut response = Response::new(ResponseBody::new(bytes));
    let h = response.headers_mut();
    if tail.is_empty() {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    } else {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(kserve::HEADER_LENGTH, HeaderValue::from(json_len));
    }
    Ok(response)
}

/// A KServe request held to model `name`: loaded, every input as it
/// declares, the outputs it has, the run within bounds. For a caller policy
/// has allowed the model: the errors name its inputs and load state.
fn kserve_tensors(
    shared: &Shared,
    name: &str,
    doc: &serde_json::Value,
    tail: &[u8],
) -> Result<(Arc<crate::onnx::OnnxModel>, crate::kserve::Checked), ApiError> {
    let Some(model) = shared.models.get_onnx(name) else {
        return Err(ApiError::ModelNotLoaded {
            model: name.to_owned(),
            why: shared
                .models
                .state(name)
                .map(|s| serde_json::to_string(&s).unwrap_or_default()),
        });
    };
    let checked =
        crate::kserve::check(doc, tail, &model.inputs, &model.outputs, model.max_elements)
            .map_err(ApiError::BadRequest)?;
    // What tract would hold for these shapes, bounded like the shapes
    // themselves: 413.
    let shapes: Vec<&[usize]> = checked.tensors.iter().map(|t| t.shape()).collect();
    model.check_activations(&shapes)?;
    Ok((model, checked))
}
