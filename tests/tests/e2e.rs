//! End-to-end tests against the real `airgate` binary. One test binary (link
//! time matters on 2 cores); the files below share it through `#[path]`.
//! Signals go to the daemon child process, never to this process.

#[path = "e2e/api.rs"]
mod api;
#[path = "e2e/audit.rs"]
mod audit;
#[path = "e2e/embeddings.rs"]
mod embeddings;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/kserve.rs"]
mod kserve;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/limits.rs"]
mod limits;
#[path = "e2e/llm.rs"]
mod llm;
#[path = "e2e/policy.rs"]
mod policy;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/tls.rs"]
mod tls;
#[path = "e2e/units.rs"]
mod units;
#[path = "e2e/usage.rs"]
mod usage;
