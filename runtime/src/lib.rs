//! What the `localup` and `localup-operator` binaries share: logging set-up, signal
//! handling, and the HTTP endpoint for probes and metrics.

pub mod http;
pub mod logging;
pub mod signals;
