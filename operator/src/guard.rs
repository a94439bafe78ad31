//! What a TcpTunnel may do: which pods it may select, in which namespaces tunnels are
//! served, and how many one namespace may hold. Every refusal is a [`Refusal`] that the
//! tunnel's status reports.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};

use crate::crd::TcpTunnel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The selector does not parse.
    InvalidSelector(String),
    /// The selector would select (nearly) every pod of the namespace.
    SelectorTooBroad,
    NamespaceNotAllowed(String),
    QuotaExceeded {
        limit: usize,
    },
    /// The spec is not what the schema allows (a CRD installed without validation).
    InvalidSpec(String),
}

/// The tunnel's selector, refusing one that does not name a label the pods must have.
/// `{}`, and selectors made only of `NotIn` and `DoesNotExist` requirements, match
/// every pod lacking some label: never what anyone means, and a way to put a sidecar
/// into every pod of the namespace.
pub fn tunnel_selector(tunnel: &TcpTunnel) -> Result<Selector, Refusal> {
    let selector: Selector = tunnel
        .spec
        .selector
        .clone()
        .try_into()
        .map_err(|error| Refusal::InvalidSelector(format!("{error}")))?;
    let names_a_label = selector.clone().into_iter().any(|expression| {
        matches!(
            expression,
            Expression::Equal(..) | Expression::In(..) | Expression::Exists(_)
        )
    });
    if !names_a_label {
        return Err(Refusal::SelectorTooBroad);
    }
    Ok(selector)
}

pub fn selects(selector: &Selector, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector.matches(labels.unwrap_or(&BTreeMap::new()))
}

/// The tunnel that serves `pod` when several select it: the oldest (then the first by
/// name) of the live tunnels of its namespace whose selector passes the guard and
/// matches the pod's labels. A pod runs one sidecar.
pub fn winner<'a>(
    namespace: &str,
    pod: &Pod,
    tunnels: impl IntoIterator<Item = &'a TcpTunnel>,
) -> Option<&'a TcpTunnel> {
    tunnels
        .into_iter()
        .filter(|tunnel| tunnel.metadata.namespace.as_deref() == Some(namespace))
        .filter(|tunnel| !tunnel.is_deleting())
        .filter(|tunnel| {
            tunnel_selector(tunnel)
                .is_ok_and(|selector| selects(&selector, pod.metadata.labels.as_ref()))
        })
        .min_by_key(|tunnel| {
            (
                tunnel.metadata.creation_timestamp.clone(),
                tunnel.name_any(),
            )
        })
}

/// Where tunnels are served: `--allowed-namespaces` and `--namespace-selector`.
#[derive(Debug, Clone, Default)]
pub struct NamespacePolicy {
    pub allowed: Vec<String>,
    pub selector: Option<NamespaceSelector>,
}

impl NamespacePolicy {
    /// Whether the namespace's labels must be read to decide.
    pub fn needs_labels(&self) -> bool {
        self.selector.is_some()
    }

    /// `labels`: the namespace's labels, when [`Self::needs_labels`].
    pub fn check(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<(), Refusal> {
        if !self.allowed.is_empty() && !self.allowed.iter().any(|allowed| allowed == namespace) {
            return Err(Refusal::NamespaceNotAllowed(format!(
                "namespace {namespace} is not among the operator's --allowed-namespaces ({})",
                self.allowed.join(", ")
            )));
        }
        if let Some(selector) = &self.selector
            && !selects(&selector.0, labels)
        {
            return Err(Refusal::NamespaceNotAllowed(format!(
                "namespace {namespace}'s labels do not match the operator's \
                 --namespace-selector {selector}"
            )));
        }
        Ok(())
    }
}

/// Whether `tunnel` may hold a port under a quota of `limit` per namespace (0: none):
/// a tunnel keeps the port it holds; a new one gets one while fewer than `limit` other
/// tunnels of its namespace hold one.
pub fn check_quota(tunnel: &TcpTunnel, tunnels: &[TcpTunnel], limit: usize) -> Result<(), Refusal> {
    if limit == 0 || tunnel.assigned_port().is_some() {
        return Ok(());
    }
    let holding = tunnels
        .iter()
        .filter(|other| other.metadata.namespace == tunnel.metadata.namespace)
        .filter(|other| other.key() != tunnel.key())
        .filter(|other| !other.is_deleting() && other.assigned_port().is_some())
        .count();
    if holding >= limit {
        return Err(Refusal::QuotaExceeded { limit });
    }
    Ok(())
}

/// A label selector in kubectl's syntax: `a=b,c!=d,e,!f,g in (h,i),j notin (k)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSelector(pub Selector, String);

impl std::fmt::Display for NamespaceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl FromStr for NamespaceSelector {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut expressions = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (index, character) in text.char_indices() {
            match character {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..index]);
                    start = index + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        for part in parts.into_iter().map(str::trim) {
            if part.is_empty() {
                return Err(format!("empty requirement in label selector {text:?}"));
            }
            expressions.push(parse_requirement(part)?);
        }
        Ok(NamespaceSelector(
            expressions.into_iter().collect(),
            text.to_owned(),
        ))
    }
}

fn parse_requirement(part: &str) -> Result<Expression, String> {
    let set = |key: &str, values: &str| -> Result<(String, _), String> {
        let values = values
            .trim()
            .strip_prefix('(')
            .and_then(|rest| rest.strip_suffix(')'))
            .ok_or_else(|| format!("expected (values) in {part:?}"))?;
        Ok((
            key.trim().to_owned(),
            values
                .split(',')
                .map(|value| value.trim().to_owned())
                .collect(),
        ))
    };
    if let Some((key, values)) = part.split_once(" notin ") {
        let (key, values) = set(key, values)?;
        return Ok(Expression::NotIn(key, values));
    }
    if let Some((key, values)) = part.split_once(" in ") {
        let (key, values) = set(key, values)?;
        return Ok(Expression::In(key, values));
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(Expression::NotEqual(key.trim().into(), value.trim().into()));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Expression::Equal(key.trim().into(), value.trim().into()));
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key.trim().into()));
    }
    if part.contains([' ', '(', ')']) {
        return Err(format!("cannot read the label requirement {part:?}"));
    }
    Ok(Expression::Exists(part.into()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    use super::*;
    use crate::crd::TcpTunnelStatus;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty())
                .then(|| values.iter().map(|value| value.to_string()).collect()),
        }
    }

    fn with_selector(selector: LabelSelector) -> TcpTunnel {
        let mut tunnel = TcpTunnel::test();
        tunnel.spec.selector = selector;
        tunnel
    }

    #[test]
    fn selectors_must_name_a_label_the_pods_have() {
        let refused = [
            LabelSelector::default(),
            LabelSelector {
                match_expressions: Some(vec![requirement("app", "DoesNotExist", &[])]),
                ..Default::default()
            },
            LabelSelector {
                match_expressions: Some(vec![
                    requirement("app", "NotIn", &["web"]),
                    requirement("tier", "DoesNotExist", &[]),
                ]),
                ..Default::default()
            },
        ];
        for selector in refused {
            assert_eq!(
                tunnel_selector(&with_selector(selector.clone())),
                Err(Refusal::SelectorTooBroad),
                "{selector:?}"
            );
        }
        let invalid = LabelSelector {
            match_expressions: Some(vec![requirement("app", "Near", &["x"])]),
            ..Default::default()
        };
        assert!(matches!(
            tunnel_selector(&with_selector(invalid)),
            Err(Refusal::InvalidSelector(_))
        ));

        let selector = tunnel_selector(&TcpTunnel::test()).unwrap();
        assert!(selects(
            &selector,
            Some(&labels(&[("app", "postgres"), ("tier", "db")]))
        ));
        assert!(!selects(&selector, Some(&labels(&[("app", "web")]))));
        assert!(!selects(&selector, None));

        // A positive requirement next to negative ones is fine.
        let mixed = LabelSelector {
            match_expressions: Some(vec![
                requirement("app", "In", &["postgres", "mysql"]),
                requirement("canary", "DoesNotExist", &[]),
            ]),
            ..Default::default()
        };
        let selector = tunnel_selector(&with_selector(mixed)).unwrap();
        assert!(selects(&selector, Some(&labels(&[("app", "mysql")]))));
        assert!(!selects(
            &selector,
            Some(&labels(&[("app", "mysql"), ("canary", "1")]))
        ));
        let exists = LabelSelector {
            match_expressions: Some(vec![requirement("app", "Exists", &[])]),
            ..Default::default()
        };
        assert!(tunnel_selector(&with_selector(exists)).is_ok());
    }

    #[test]
    fn namespaces_are_served_by_name_or_label() {
        let open = NamespacePolicy::default();
        assert!(!open.needs_labels());
        assert_eq!(open.check("anything", None), Ok(()));

        let listed = NamespacePolicy {
            allowed: vec!["dev".into(), "qa".into()],
            selector: None,
        };
        assert_eq!(listed.check("dev", None), Ok(()));
        let Err(Refusal::NamespaceNotAllowed(message)) = listed.check("prod", None) else {
            panic!("prod is not listed");
        };
        assert!(message.contains("prod") && message.contains("dev, qa"));

        let labelled = NamespacePolicy {
            allowed: vec![],
            selector: Some("localup.dev/tunnels=allowed".parse().unwrap()),
        };
        assert!(labelled.needs_labels());
        let allowed = labels(&[("localup.dev/tunnels", "allowed")]);
        assert_eq!(labelled.check("dev", Some(&allowed)), Ok(()));
        assert!(labelled.check("dev", Some(&labels(&[]))).is_err());
        assert!(labelled.check("dev", None).is_err());
    }

    #[test]
    fn namespace_selectors_read_kubectl_syntax() {
        let parse = |text: &str| text.parse::<NamespaceSelector>().map(|selector| selector.0);
        let selector =
            parse("team=data, env in (dev,qa),!frozen,owner,tier!=db,zone notin (a)").unwrap();
        let check = |pairs: &[(&str, &str)]| selects(&selector, Some(&labels(pairs)));
        assert!(check(&[("team", "data"), ("env", "qa"), ("owner", "x")]));
        assert!(!check(&[("team", "data"), ("env", "prod"), ("owner", "x")]));
        assert!(!check(&[
            ("team", "data"),
            ("env", "qa"),
            ("owner", "x"),
            ("frozen", "1")
        ]));
        assert!(!check(&[
            ("team", "data"),
            ("env", "qa"),
            ("owner", "x"),
            ("tier", "db")
        ]));
        assert!(!check(&[("team", "data"), ("env", "qa")]));
        assert!(parse("a=b,").is_err());
        assert!(parse("env in dev").is_err());
    }

    #[test]
    fn the_quota_counts_other_tunnels_holding_a_port() {
        let holding = |name: &str, namespace: &str, port: Option<i32>| {
            let mut tunnel = TcpTunnel::test().named(name);
            tunnel.metadata.namespace = Some(namespace.into());
            tunnel.metadata.uid = Some(format!("uid-{namespace}-{name}"));
            tunnel.status = Some(TcpTunnelStatus {
                remote_port: port,
                ..Default::default()
            });
            tunnel
        };
        let tunnels = vec![
            holding("a", "dev", Some(10000)),
            holding("b", "dev", Some(10001)),
            holding("c", "other", Some(10002)),
            holding("d", "dev", None),
        ];
        let new = holding("new", "dev", None);
        assert_eq!(check_quota(&new, &tunnels, 0), Ok(()));
        assert_eq!(check_quota(&new, &tunnels, 3), Ok(()));
        assert_eq!(
            check_quota(&new, &tunnels, 2),
            Err(Refusal::QuotaExceeded { limit: 2 })
        );
        // A tunnel already holding a port keeps it when the quota is lowered.
        assert_eq!(check_quota(&tunnels[0], &tunnels, 1), Ok(()));
    }
}
