"""The session's last test (see `session_end` in conftest.py): `helm uninstall` takes
away what the charts installed, also after the operator has server-side-applied its
caBundle into the webhook configuration. Nothing can run after it: the releases are
gone."""
from __future__ import annotations

import pytest

from helpers import OPERATOR, RELAY, SYSTEM_NS, helm, wait_for

MWC = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}"


@pytest.mark.session_end(2)
def test_helm_uninstall_removes_the_charts_objects(kube, op, operator_session, releases):
    mwc = kube.get(MWC)
    assert mwc["webhooks"][0]["clientConfig"].get("caBundle"), "the operator should have registered its caBundle"
    operator_session.stop()  # as scaling the Deployment away would

    helm("uninstall", OPERATOR, "-n", SYSTEM_NS)
    helm("uninstall", RELAY, "-n", SYSTEM_NS)
    def left() -> dict:
        objects = {
            "MutatingWebhookConfiguration": kube.get_opt(MWC),
            "ClusterRole": kube.get_opt(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{OPERATOR}"),
            "ClusterRoleBinding": kube.get_opt(f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{OPERATOR}"),
            "webhook Service": kube.service(SYSTEM_NS, f"{OPERATOR}-webhook"),
            "operator Deployment": kube.get_opt(kube.apps(SYSTEM_NS, "deployments", OPERATOR)),
            "relay Service": kube.service(SYSTEM_NS, RELAY),
            "relay JWT Secret": kube.secret(SYSTEM_NS, f"{RELAY}-jwt"),
            "relay TLS Secret": kube.secret(SYSTEM_NS, f"{RELAY}-tls"),
        }
        return {k: v for k, v in objects.items() if v is not None and not v["metadata"].get("deletionTimestamp")}

    wait_for(lambda: not left(), timeout=20, what="nothing of the releases to be left",
             describe=lambda: "left behind by helm uninstall: " + ", ".join(
                 f"{k} (labels {v['metadata'].get('labels')})" for k, v in left().items()))
    # The CRD stays (Helm never deletes crds/), so TcpTunnels are not lost by accident.
    assert kube.get_opt("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tcptunnels.localup.dev")
