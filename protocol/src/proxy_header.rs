//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a tunnel may put in
//! front of each connection towards the local service, so the service sees the
//! external peer's address instead of the client's. The client writes it: the relay
//! already tells it each connection's peer, and the header then travels only on the
//! local hop that needs it.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The human-readable header (`PROXY TCP4 src dst sport dport\r\n`).
    V1,
    /// The binary header.
    V2,
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

impl FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            other => Err(format!(
                "unknown PROXY protocol version {other:?} (expected v1 or v2)"
            )),
        }
    }
}

/// The header announcing a connection from `peer` to `local`. Mixed address families
/// (an IPv4 peer on an IPv6 listener) are written in the peer's family, with the
/// listener's address mapped or left unspecified accordingly.
pub fn header(version: ProxyProtocol, peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (peer, local) = same_family(peer, local);
    match version {
        ProxyProtocol::V1 => {
            let addresses = match (peer, local) {
                (SocketAddr::V4(peer), SocketAddr::V4(local)) => {
                    ppp::v1::Addresses::new_tcp4(*peer.ip(), *local.ip(), peer.port(), local.port())
                }
                (SocketAddr::V6(peer), SocketAddr::V6(local)) => {
                    ppp::v1::Addresses::new_tcp6(*peer.ip(), *local.ip(), peer.port(), local.port())
                }
                _ => unreachable!("same_family returns one family"),
            };
            addresses.to_string().into_bytes()
        }
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (peer, local),
        )
        .build()
        .expect("a header without TLVs always encodes"),
    }
}

fn same_family(peer: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let local_ip = local.ip().to_canonical();
    let local_ip = match (peer, local_ip) {
        (SocketAddr::V4(_), std::net::IpAddr::V6(_)) => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        }
        (SocketAddr::V6(_), std::net::IpAddr::V4(ip)) => std::net::IpAddr::V6(ip.to_ipv6_mapped()),
        (_, ip) => ip,
    };
    (peer, SocketAddr::new(local_ip, local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_is_the_text_line() {
        let header = header(
            ProxyProtocol::V1,
            "203.0.113.7:51000".parse().unwrap(),
            "10.0.0.5:16432".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8(header).unwrap(),
            "PROXY TCP4 203.0.113.7 10.0.0.5 51000 16432\r\n"
        );
        let header = header_v1_6();
        assert_eq!(header, "PROXY TCP6 2001:db8::1 2001:db8::2 51000 16432\r\n");
    }

    fn header_v1_6() -> String {
        String::from_utf8(header(
            ProxyProtocol::V1,
            "[2001:db8::1]:51000".parse().unwrap(),
            "[2001:db8::2]:16432".parse().unwrap(),
        ))
        .unwrap()
    }

    #[test]
    fn version_2_parses_back_to_the_same_addresses() {
        let peer: SocketAddr = "[2001:db8::1]:51000".parse().unwrap();
        let local: SocketAddr = "[2001:db8::2]:16432".parse().unwrap();
        let bytes = header(ProxyProtocol::V2, peer, local);
        let parsed = ppp::v2::Header::try_from(&bytes[..]).unwrap();
        assert_eq!(parsed.addresses, ppp::v2::Addresses::from((peer, local)));
        assert_eq!(bytes.len(), parsed.len());
    }

    #[test]
    fn a_v4_peer_on_a_v6_listener_is_written_as_v4() {
        let header = header(
            ProxyProtocol::V1,
            "[::ffff:198.51.100.9]:4000".parse().unwrap(),
            "[::]:16432".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8(header).unwrap(),
            "PROXY TCP4 198.51.100.9 0.0.0.0 4000 16432\r\n"
        );
    }

    #[test]
    fn versions_parse_from_flags_and_claims() {
        assert_eq!("v2".parse::<ProxyProtocol>().unwrap(), ProxyProtocol::V2);
        assert!(
            "v3".parse::<ProxyProtocol>()
                .unwrap_err()
                .contains("v1 or v2")
        );
        assert_eq!(serde_json::to_string(&ProxyProtocol::V1).unwrap(), "\"v1\"");
    }
}
