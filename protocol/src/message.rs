//! Control messages. The client opens one control stream per connection and sends a
//! [`Hello`]; the relay answers with a [`HelloReply`]. For the rest of the tunnel's life
//! both sides keep that stream open and exchange [`ClientMessage`]s and
//! [`RelayMessage`]s on it; the client finishing its side asks for a drain. Every
//! external TCP connection arrives as a relay-opened stream that starts with a
//! [`StreamHeader`], answered by the client's [`StreamReply`] before any payload.
//!
//! Messages are JSON so that fields can be added without a new protocol version: an
//! optional field an older peer does not know is ignored by it. Anything that changes
//! the meaning of existing messages gets a new ALPN ([`crate::ALPN`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::proxy_header::ProxyProtocol;

/// The first message a client sends on its control stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
        /// When the relay ends the tunnel unless the client presents a renewed token
        /// (Unix seconds); `None` for tokens without expiry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// The PROXY protocol header the token asks the client to put in front of
        /// every connection towards the local service.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy_protocol: Option<ProxyProtocol>,
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
    /// The token's subject already holds as many tunnels (or pool members) as the
    /// relay allows one subject.
    TooManyTunnels,
    /// The relay is at its limit of clients that are still saying hello.
    Busy,
    /// The port was assigned to another tunnel after this token was minted.
    Superseded,
}

impl Refusal {
    /// Refusals that no amount of waiting fixes: a reconnecting client gives up on
    /// these unless its token changes.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Refusal::AuthenticationFailed
                | Refusal::PortOutOfRange
                | Refusal::PortNotAllowed
                | Refusal::Malformed
                | Refusal::Superseded
        )
    }
}

/// What a client may send on its control stream after the hello.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// A renewed token for the same tunnel, replacing the one the hello carried.
    Renew { token: String },
    /// The answer to [`RelayMessage::Ping`].
    Pong { id: u64 },
}

/// What the relay may send on a client's control stream after the hello reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMessage {
    /// The renewed token is in force; the tunnel now lasts until `expires_at`.
    Renewed { expires_at: Option<u64> },
    /// The renewed token was refused; the tunnel keeps its previous token.
    RenewRefused { message: String },
    /// Is this client still there? Sent when a new connection of the same subject
    /// asks for this client's port: a client that does not answer is replaced.
    Ping { id: u64 },
    /// The relay is ending the tunnel; the connection closes right after.
    Closing {
        reason: ClosingReason,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClosingReason {
    /// The token expired and no renewal arrived in time.
    TokenExpired,
    /// A newer connection of the same subject took the port over.
    Replaced,
    /// The port now belongs to another tunnel.
    Superseded,
    /// The relay is shutting down.
    Shutdown,
}

/// Written by the relay at the start of every data stream. QUIC only tells the peer
/// about a stream once bytes flow on it, so this also makes server-speaks-first
/// protocols (MySQL, SMTP) work: the client learns of the connection at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamHeader {
    /// The external peer.
    pub peer: SocketAddr,
    /// The relay's address the peer connected to (the tunnel's public port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
}

/// The client's first message on a data stream, before any payload: whether the local
/// service took the connection. The relay forwards nothing until it has this, so a
/// refusal loses no byte and the relay can offer the connection to another member of
/// the tunnel's pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StreamReply {
    Connected,
    Unreachable { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_from_newer_peers_are_ignored() {
        let hello: Hello =
            serde_json::from_str(r#"{"token":"t","remote_port":16432,"something_new":{"x":1}}"#)
                .unwrap();
        assert_eq!(hello.remote_port, Some(16432));
        let reply: HelloReply =
            serde_json::from_str(r#"{"result":"accepted","port":1,"public_addr":"h:1","new":2}"#)
                .unwrap();
        assert!(matches!(reply, HelloReply::Accepted { port: 1, .. }));
    }

    #[test]
    fn wrong_types_and_missing_fields_are_refused() {
        for text in [
            r#"{"token":1,"remote_port":null}"#,
            r#"{"remote_port":5}"#,
            r#"{"token":"t","remote_port":70000}"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Hello>(text).is_err(), "{text}");
        }
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"launch"}"#).is_err());
    }

    #[test]
    fn control_messages_round_trip() {
        for message in [
            ClientMessage::Renew { token: "t".into() },
            ClientMessage::Pong { id: 7 },
        ] {
            let text = serde_json::to_string(&message).unwrap();
            assert_eq!(
                serde_json::from_str::<ClientMessage>(&text).unwrap(),
                message
            );
        }
        let closing = RelayMessage::Closing {
            reason: ClosingReason::TokenExpired,
            message: "m".into(),
        };
        let text = serde_json::to_string(&closing).unwrap();
        assert_eq!(
            text,
            r#"{"type":"closing","reason":"token_expired","message":"m"}"#
        );
    }
}
