//! Port ranges such as `10000-20000`, as written on the command line and in token claims.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive range of TCP ports; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid port range {input:?}: {reason} (expected PORT or START-END, e.g. 10000-20000)")]
pub struct ParsePortRangeError {
    input: String,
    reason: &'static str,
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Option<Self> {
        (start != 0 && start <= end).then_some(Self { start, end })
    }

    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn intersect(&self, other: &PortRange) -> Option<PortRange> {
        PortRange::new(self.start.max(other.start), self.end.min(other.end))
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + Clone + use<> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = ParsePortRangeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParsePortRangeError {
            input: input.to_owned(),
            reason,
        };
        let parse_port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| error("ports are numbers from 1 to 65535"))
        };
        let (start, end) = match input.split_once('-') {
            Some((start, end)) => (parse_port(start)?, parse_port(end)?),
            None => {
                let port = parse_port(input)?;
                (port, port)
            }
        };
        if start == 0 {
            return Err(error("port 0 cannot be served"));
        }
        PortRange::new(start, end).ok_or_else(|| error("the start is above the end"))
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        let range: PortRange = "10000-20000".parse().unwrap();
        assert_eq!(
            (range.start(), range.end(), range.len()),
            (10000, 20000, 10001)
        );
        assert_eq!(
            "16432".parse::<PortRange>().unwrap(),
            PortRange::single(16432).unwrap()
        );
        assert_eq!(range.to_string(), "10000-20000");
        assert_eq!(PortRange::single(5).unwrap().to_string(), "5");
    }

    #[test]
    fn rejects_nonsense_with_the_reason() {
        for (input, reason) in [
            ("20000-10000", "start is above"),
            ("0-10", "port 0"),
            ("10-70000", "1 to 65535"),
            ("abc", "1 to 65535"),
        ] {
            let message = input.parse::<PortRange>().unwrap_err().to_string();
            assert!(message.contains(reason), "{input}: {message}");
        }
    }

    #[test]
    fn intersects() {
        let relay: PortRange = "10000-20000".parse().unwrap();
        let token: PortRange = "19000-21000".parse().unwrap();
        assert_eq!(relay.intersect(&token).unwrap().to_string(), "19000-20000");
        assert_eq!(relay.intersect(&"30000".parse().unwrap()), None);
    }
}
