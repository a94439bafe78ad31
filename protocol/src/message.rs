//! Control messages. The client opens one control stream per QUIC connection and sends
//! a [`Hello`]; the relay answers with a [`HelloReply`]. Every external TCP connection
//! then arrives as a relay-opened stream that starts with a [`StreamHeader`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The first and only message a client sends on its control stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// A JWT signed with the relay's secret.
    pub token: String,
    /// The public port the client wants; `None` lets the relay choose.
    pub remote_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum HelloReply {
    Accepted {
        port: u16,
        /// `domain:port` as external clients should dial it.
        public_addr: String,
    },
    Refused {
        reason: Refusal,
        /// One line for the user: what happened and what to do.
        message: String,
    },
}

/// Why a relay refused a tunnel. Clients decide from this whether retrying can help.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    AuthenticationFailed,
    PortOutOfRange,
    PortNotAllowed,
    PortInUse,
    NoFreePort,
    Malformed,
}

impl Refusal {
    /// Refusals that no amount of waiting fixes: a reconnecting client gives up on these.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Refusal::AuthenticationFailed
                | Refusal::PortOutOfRange
                | Refusal::PortNotAllowed
                | Refusal::Malformed
        )
    }
}

/// Written by the relay at the start of every data stream. QUIC only tells the peer
/// about a stream once bytes flow on it, so this also makes server-speaks-first
/// protocols (MySQL, SMTP) work: the client learns of the connection at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamHeader {
    /// The external peer, for logs.
    pub peer: SocketAddr,
}
