//! The webhook's serving certificate and its registration with the API server.
//!
//! The certificate is self-signed and kept in a Secret, so every replica serves the same
//! one and the caBundle written into the MutatingWebhookConfiguration fits them all.
//! It is replaced only when the names it must cover change (another Service or URL).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::config::Config;
use crate::keys::{INJECTION_LABEL, MANAGED_BY_LABEL, MANAGER};

/// Records which names the stored certificate was made for.
const NAMES_ANNOTATION: &str = "localup.dev/certificate-names";

pub const WEBHOOK_PATH: &str = "/mutate";
pub const WEBHOOK_NAME: &str = "inject.localup.dev";

/// How the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookTarget {
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
    Url(String),
}

pub fn webhook_client_config(target: &WebhookTarget, ca_pem: &str) -> WebhookClientConfig {
    let ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    match target {
        WebhookTarget::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            ca_bundle,
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(WEBHOOK_PATH.into()),
                port: Some(*port),
            }),
            url: None,
        },
        WebhookTarget::Url(url) => WebhookClientConfig {
            ca_bundle,
            service: None,
            url: Some(url.clone()),
        },
    }
}

/// The webhook registration: pod CREATE only, failing open within 5 s so a broken or
/// absent operator never blocks pod creation, and never called for kube-system, the
/// operator's own namespace or namespaces labelled `localup.dev/injection: disabled`.
pub fn mutating_webhook_configuration(
    name: &str,
    target: &WebhookTarget,
    ca_pem: &str,
    operator_namespace: &str,
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        // No managed-by label: when the chart ships this object, Helm owns it only while
        // its own `app.kubernetes.io/managed-by: Helm` stays.
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            client_config: webhook_client_config(target, ca_pem),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    LabelSelectorRequirement {
                        key: INJECTION_LABEL.into(),
                        operator: "NotIn".into(),
                        values: Some(vec!["disabled".into()]),
                    },
                    LabelSelectorRequirement {
                        key: "kubernetes.io/metadata.name".into(),
                        operator: "NotIn".into(),
                        values: Some(vec!["kube-system".into(), operator_namespace.into()]),
                    },
                ]),
                ..Default::default()
            }),
            failure_policy: Some("Ignore".into()),
            match_policy: Some("Equivalent".into()),
            reinvocation_policy: Some("Never".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            admission_review_versions: vec!["v1".into()],
            ..Default::default()
        }]),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read or write the webhook certificate Secret {secret}: {source}")]
    Secret {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot register the webhook in MutatingWebhookConfiguration {name}: {source}")]
    Registration {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the Secret {0} holds no usable tls.crt/tls.key")]
    Unusable(String),
}

#[derive(Debug, Clone)]
pub struct ServingCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn target(config: &Config) -> WebhookTarget {
    match &config.webhook_url {
        Some(url) => WebhookTarget::Url(url.clone()),
        None => WebhookTarget::Service {
            namespace: config.namespace.clone(),
            name: config.webhook_service.clone(),
            port: config.webhook_service_port,
        },
    }
}

/// The names the API server may use to reach the webhook.
pub fn certificate_names(target: &WebhookTarget) -> Vec<String> {
    match target {
        WebhookTarget::Service {
            namespace, name, ..
        } => vec![
            name.clone(),
            format!("{name}.{namespace}"),
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}.svc.cluster.local"),
        ],
        WebhookTarget::Url(url) => url_host(url).into_iter().collect(),
    }
}

fn url_host(url: &str) -> Option<String> {
    let authority = url.split_once("://")?.1.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next()?,
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// The certificate stored in the Secret, or a new one stored there. Replicas starting
/// together race to create it: the loser reads the winner's.
pub async fn ensure_serving_certificate(
    client: Client,
    config: &Config,
    names: &[String],
) -> Result<ServingCertificate, Error> {
    let secrets: Api<Secret> = Api::namespaced(client, &config.namespace);
    let secret_name = &config.webhook_cert_secret;
    let wrap = |source| Error::Secret {
        secret: format!("{}/{secret_name}", config.namespace),
        source,
    };
    let wanted = names.join(",");
    loop {
        let existing = secrets.get_opt(secret_name).await.map_err(wrap)?;
        if let Some(secret) = &existing {
            let made_for = secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(NAMES_ANNOTATION));
            if made_for == Some(&wanted) {
                return read(secret).ok_or_else(|| Error::Unusable(secret_name.clone()));
            }
        }
        let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
        let certificate = ServingCertificate {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        };
        let mut secret = tls_secret(secret_name, &wanted, &certificate);
        let written = match existing {
            Some(existing) => {
                secret.metadata.resource_version = existing.metadata.resource_version;
                secrets
                    .replace(secret_name, &PostParams::default(), &secret)
                    .await
            }
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %secret_name, names = %wanted, "generated the webhook's serving certificate");
                return Ok(certificate);
            }
            // Another replica wrote it first: use theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(wrap(error)),
        }
    }
}

fn tls_secret(name: &str, names: &str, certificate: &ServingCertificate) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGER.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                NAMES_ANNOTATION.to_owned(),
                names.to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(certificate.cert_pem.clone().into_bytes()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(certificate.key_pem.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    }
}

fn read(secret: &Secret) -> Option<ServingCertificate> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
    Some(ServingCertificate {
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
    })
}

/// Points the MutatingWebhookConfiguration at this operator with the current caBundle.
/// When it does not exist yet (no chart), the whole registration is applied. When it
/// does (the chart ships it without a caBundle), only the client configuration is
/// patched, strategically so that the other way of reaching the webhook (`url` versus
/// `service`) is removed: the API server accepts exactly one.
pub async fn register(
    client: Client,
    config: &Config,
    target: &WebhookTarget,
    ca_pem: &str,
) -> Result<(), Error> {
    let name = &config.webhook_configuration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let wrap = |source| Error::Registration {
        name: name.clone(),
        source,
    };
    let (params, patch) = if api.get_opt(name).await.map_err(wrap)?.is_some() {
        let mut client_config =
            serde_json::to_value(webhook_client_config(target, ca_pem)).expect("serializable");
        for way in ["url", "service"] {
            client_config
                .as_object_mut()
                .expect("an object")
                .entry(way)
                .or_insert(serde_json::Value::Null);
        }
        let patch = serde_json::json!({
            "webhooks": [{"name": WEBHOOK_NAME, "clientConfig": client_config}]
        });
        (PatchParams::default(), Patch::Strategic(patch))
    } else {
        let configuration = mutating_webhook_configuration(name, target, ca_pem, &config.namespace);
        let mut object = serde_json::to_value(&configuration).expect("serializable");
        object["apiVersion"] = "admissionregistration.k8s.io/v1".into();
        object["kind"] = "MutatingWebhookConfiguration".into();
        (PatchParams::apply(MANAGER).force(), Patch::Apply(object))
    };
    api.patch(name, &params, &patch).await.map_err(wrap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_target_covers_every_cluster_dns_form() {
        let target = WebhookTarget::Service {
            namespace: "localup-system".into(),
            name: "localup-operator-webhook".into(),
            port: 443,
        };
        assert_eq!(
            certificate_names(&target),
            [
                "localup-operator-webhook",
                "localup-operator-webhook.localup-system",
                "localup-operator-webhook.localup-system.svc",
                "localup-operator-webhook.localup-system.svc.cluster.local",
            ]
        );
    }

    #[test]
    fn webhook_client_config_points_at_the_service_or_the_url() {
        let service = webhook_client_config(
            &WebhookTarget::Service {
                namespace: "localup-system".into(),
                name: "localup-operator-webhook".into(),
                port: 443,
            },
            "PEM",
        );
        assert_eq!(service.url, None);
        let reference = service.service.unwrap();
        assert_eq!(reference.path.as_deref(), Some("/mutate"));
        assert_eq!(service.ca_bundle, Some(ByteString(b"PEM".to_vec())));

        let url = webhook_client_config(
            &WebhookTarget::Url("https://127.0.0.1:9443/mutate".into()),
            "PEM",
        );
        assert_eq!(url.url.as_deref(), Some("https://127.0.0.1:9443/mutate"));
        assert_eq!(url.service, None);
    }

    #[test]
    fn webhook_registration_fails_open_on_pod_creation_only() {
        let target = WebhookTarget::Url("https://127.0.0.1:9443/mutate".into());
        let configuration =
            mutating_webhook_configuration("localup-operator", &target, "PEM", "localup-system");
        let webhook = &configuration.webhooks.as_ref().unwrap()[0];
        assert_eq!(webhook.name, "inject.localup.dev");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(webhook.timeout_seconds, Some(5));
        let rule = &webhook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
        assert_eq!(webhook.client_config.ca_bundle.as_ref().unwrap().0, b"PEM");
        let excluded = &webhook
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions;
        let excluded = &excluded.as_ref().unwrap()[1];
        assert_eq!(
            excluded.values.as_deref().unwrap(),
            ["kube-system", "localup-system"]
        );
    }

    #[test]
    fn a_url_target_covers_its_host() {
        let names = |url: &str| certificate_names(&WebhookTarget::Url(url.into()));
        assert_eq!(names("https://10.0.2.15:9443/mutate"), ["10.0.2.15"]);
        assert_eq!(names("https://op.example.com/mutate"), ["op.example.com"]);
        assert_eq!(names("https://[::1]:9443/mutate"), ["::1"]);
    }
}
