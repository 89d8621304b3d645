//! RBAC and ServiceAccounts: the apiserver's ClusterRole is read-only on exactly the kinds its
//! Kubernetes source watches; only the certgen Job (and the renewal CronJob, by name) may touch
//! Secrets, in the release namespace, each under its own ServiceAccount.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use std::collections::BTreeSet;

use serde_yaml::Value;

use chart_tests::helm::{NAMESPACE, RELEASE, Rendered};
use chart_tests::manifest::{at, seq_at, str_at, strings};

/// (apiGroup, resource) the apiserver's Kubernetes source reads; each gets exactly get/list/watch.
const READ_KINDS: &[(&str, &str)] = &[
    ("", "services"),
    ("", "pods"),
    ("", "namespaces"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    ("multicluster.x-k8s.io", "serviceexports"),
];

/// Every (apiGroup, resource, verb, resourceNames) a role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in seq_at(role, &["rules"]) {
        assert!(
            seq_at(rule, &["nonResourceURLs"]).is_empty(),
            "role grants nonResourceURLs: {rule:?}"
        );
        let names = strings(seq_at(rule, &["resourceNames"]));
        for g in strings(seq_at(rule, &["apiGroups"])) {
            for res in strings(seq_at(rule, &["resources"])) {
                for verb in strings(seq_at(rule, &["verbs"])) {
                    out.insert((g.clone(), res.clone(), verb, names.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_read_on_the_watched_kinds_and_nothing_else() {
    for r in Rendered::all() {
        let name = &r.case.name;
        let source = str_at(&r.values, &["apiserver", "source"]).unwrap_or("kubernetes");
        let cluster_roles: Vec<&Value> = r.of_kind("ClusterRole").collect();
        if source == "manifests" {
            assert!(
                cluster_roles.is_empty(),
                "{name}: the manifests source needs no ClusterRole"
            );
            let dep = r.apiserver();
            assert_eq!(
                at(
                    dep,
                    &["spec", "template", "spec", "automountServiceAccountToken"]
                )
                .and_then(Value::as_bool),
                Some(false),
                "{name}: the manifests source needs no API token"
            );
            continue;
        }
        assert_eq!(
            cluster_roles.len(),
            1,
            "{name}: one ClusterRole, the apiserver's"
        );
        let got = grants(cluster_roles[0]);
        let want: BTreeSet<(String, String, String, Vec<String>)> = READ_KINDS
            .iter()
            .flat_map(|(g, res)| {
                ["get", "list", "watch"]
                    .into_iter()
                    .map(move |v| (g.to_string(), res.to_string(), v.to_owned(), Vec::new()))
            })
            .collect();
        assert_eq!(
            got, want,
            "{name}: the apiserver's ClusterRole must be exactly read on {READ_KINDS:?}"
        );

        // It is bound to the apiserver's ServiceAccount only.
        let bindings: Vec<&Value> = r.of_kind("ClusterRoleBinding").collect();
        assert_eq!(bindings.len(), 1, "{name}: one ClusterRoleBinding");
        let subjects = seq_at(bindings[0], &["subjects"]);
        assert_eq!(subjects.len(), 1, "{name}: {subjects:?}");
        let sa = str_at(
            r.apiserver(),
            &["spec", "template", "spec", "serviceAccountName"],
        )
        .unwrap();
        assert_eq!(
            str_at(&subjects[0], &["name"]),
            Some(sa),
            "{name}: binding subject"
        );
        assert_eq!(
            str_at(bindings[0], &["roleRef", "name"]),
            str_at(cluster_roles[0], &["metadata", "name"])
        );
    }
}

#[test]
fn only_the_certgen_job_may_touch_secrets_and_only_in_its_namespace() {
    for r in Rendered::all() {
        let name = &r.case.name;
        let mode = str_at(&r.values, &["certs", "mode"]).unwrap_or("job");
        let roles: Vec<&Value> = r.of_kind("Role").collect();
        if mode != "job" {
            assert!(roles.is_empty(), "{name}: no Role outside certs.mode=job");
            assert_eq!(
                r.of_kind("Job").count(),
                0,
                "{name}: no certgen Job outside certs.mode=job"
            );
            continue;
        }
        let renew_on = at(&r.values, &["certs", "job", "renew", "enabled"])
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let renew_name = format!("{RELEASE}-clustermesh-cert-renew");
        let (renew_roles, roles): (Vec<&Value>, Vec<&Value>) = roles
            .into_iter()
            .partition(|r| str_at(r, &["metadata", "name"]) == Some(renew_name.as_str()));
        assert_eq!(
            roles.len(),
            1,
            "{name}: one Role besides the renewal's, the certgen Job's"
        );
        assert_eq!(
            renew_roles.len(),
            usize::from(renew_on),
            "{name}: the renewal Role"
        );
        if let Some(rr) = renew_roles.first() {
            // The renewal CronJob: get and update the two leaf Secrets, get the intermediate, by name.
            let api = format!("{RELEASE}-clustermesh-apiserver-tls");
            let ns = format!("{RELEASE}-clustermesh-node-sync-tls");
            let inter = format!("{RELEASE}-clustermesh-intermediate");
            for rule in seq_at(rr, &["rules"]) {
                let names = strings(seq_at(rule, &["resourceNames"]));
                let verbs = strings(seq_at(rule, &["verbs"]));
                assert_eq!(strings(seq_at(rule, &["resources"])), ["secrets"]);
                assert!(
                    !names.is_empty(),
                    "{name}: renewal rule without resourceNames"
                );
                if verbs.contains(&"update".to_owned()) {
                    assert_eq!(names, [api.clone(), ns.clone()], "{name}");
                    assert_eq!(verbs, ["get", "update"], "{name}");
                } else {
                    assert_eq!(names, std::slice::from_ref(&inter), "{name}");
                    assert_eq!(verbs, ["get"], "{name}");
                }
            }
            let cron = r.one("CronJob", "-cert-renew");
            let sa = str_at(
                cron,
                &[
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "spec",
                    "serviceAccountName",
                ],
            );
            assert_eq!(
                sa,
                Some(renew_name.as_str()),
                "{name}: the CronJob's own account"
            );
        }
        let role = roles[0];
        assert_eq!(str_at(role, &["metadata", "namespace"]), Some(NAMESPACE));
        for (group, res, verb, _) in grants(role) {
            assert_eq!(
                (group.as_str(), res.as_str()),
                ("", "secrets"),
                "{name}: certgen Role"
            );
            assert!(
                matches!(verb.as_str(), "get" | "create"),
                "{name}: certgen may not {verb} secrets"
            );
        }
        let job = r.one("Job", "-certgen");
        let job_sa = str_at(job, &["spec", "template", "spec", "serviceAccountName"]).unwrap();
        for sa in [
            str_at(
                r.apiserver(),
                &["spec", "template", "spec", "serviceAccountName"],
            )
            .unwrap(),
            str_at(
                r.node_sync(),
                &["spec", "template", "spec", "serviceAccountName"],
            )
            .unwrap(),
        ] {
            assert_ne!(
                sa, job_sa,
                "{name}: the certgen ServiceAccount is the Job's own"
            );
        }
        let bindings: Vec<&Value> = r
            .of_kind("RoleBinding")
            .filter(|b| str_at(b, &["metadata", "name"]) != Some(renew_name.as_str()))
            .collect();
        assert_eq!(
            bindings.len(),
            1,
            "{name}: one RoleBinding besides the renewal's"
        );
        let subjects = seq_at(bindings[0], &["subjects"]);
        assert_eq!(subjects.len(), 1);
        assert_eq!(str_at(&subjects[0], &["name"]), Some(job_sa));
        // The Role, its binding and the Job exist only while the pre-install hook runs.
        for obj in [role, bindings[0], job] {
            let hook = str_at(obj, &["metadata", "annotations", "helm.sh/hook"]).unwrap_or("");
            assert!(
                hook.contains("pre-install"),
                "{name}: {obj:?} must be a pre-install hook"
            );
        }
    }
}
