//! The values schema and the chart's own checks refuse what cannot work: bad cluster ids and
//! names, and settings that contradict each other, with an error that names the value.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use chart_tests::helm::template_set;

#[test]
fn schema_refuses_bad_cluster_ids() {
    for (sets, path) in [
        (&["cluster.id=0"][..], "/cluster/id"),
        (&["cluster.id=256"][..], "/cluster/id"),
        (&["cluster.id=-1"][..], "/cluster/id"),
        (
            &["cluster.id=512", "clustermesh.maxConnectedClusters=511"][..],
            "/cluster/id",
        ),
        (
            &["clustermesh.maxConnectedClusters=300"][..],
            "/clustermesh/maxConnectedClusters",
        ),
        (&["cluster.id=seven"][..], "/cluster/id"),
    ] {
        let err = template_set(sets).expect_err(&format!("helm template --set {sets:?} must fail"));
        assert!(
            err.contains("schema") && err.contains(path),
            "--set {sets:?}: the error must name {path}:\n{err}"
        );
    }
    for sets in [
        &["cluster.id=1"][..],
        &["cluster.id=255"][..],
        &[
            "cluster.id=256",
            "clustermesh.maxConnectedClusters=511",
            "certs.mode=existing",
            "certs.existing.apiserverSecret=a",
        ][..],
        &[
            "cluster.id=511",
            "clustermesh.maxConnectedClusters=511",
            "certs.mode=existing",
            "certs.existing.apiserverSecret=a",
        ][..],
    ] {
        let yaml = template_set(sets).unwrap_or_else(|e| panic!("--set {sets:?} must render: {e}"));
        let id = sets[0].trim_start_matches("cluster.id=");
        assert!(
            yaml.contains(&format!("--cluster-id={id}")),
            "--set {sets:?}"
        );
    }
}

#[test]
fn schema_refuses_bad_cluster_names() {
    for bad in [
        "default",
        "Cluster1",
        "-leading-dash",
        "trailing-dash-",
        "under_score",
        "dot.ted",
        "a23456789012345678901234567890123",
        "",
    ] {
        let err = template_set(&[&format!("cluster.name={bad}")])
            .expect_err(&format!("cluster.name={bad:?} must be refused"));
        assert!(
            err.contains("/cluster/name"),
            "cluster.name={bad:?}: the error must name /cluster/name:\n{err}"
        );
    }
    // Static remote clusters follow the same rules.
    let err = template_set(&[
        "clustermesh.config.clusters[0].name=default",
        "clustermesh.config.clusters[0].endpoints[0]=https://10.0.0.1:2379",
    ])
    .expect_err("a static remote named default must be refused");
    assert!(err.contains("/clustermesh/config/clusters/0/name"), "{err}");
    for good in [
        "a",
        "c1",
        "prod-eu-west-1",
        "a2345678901234567890123456789012",
    ] {
        template_set(&[&format!("cluster.name={good}")])
            .unwrap_or_else(|e| panic!("cluster.name={good:?} must render: {e}"));
    }
}

#[test]
fn chart_refuses_settings_that_cannot_work() {
    for (sets, needle) in [
        (&["apiserver.replicas=2"][..], "/apiserver/replicas"),
        (&["etcd.mode=external"][..], "/etcd/external/endpoints"),
        (
            &["certs.mode=existing"][..],
            "certs.existing.apiserverSecret is required",
        ),
        (
            &["certs.mode=certManager"][..],
            "certs.certManager.issuerRef.name",
        ),
        (
            &[
                "clustermesh.config.clusters[0].name=cluster1",
                "clustermesh.config.clusters[0].endpoints[0]=https://10.0.0.1:2379",
            ][..],
            "is this cluster's own name",
        ),
        (
            &["nodeSync.health.interval=fast"][..],
            "/nodeSync/health/interval",
        ),
        (
            &["cluster.id=300", "clustermesh.maxConnectedClusters=511"][..],
            "issues cluster ids 1..255 only",
        ),
        (
            &[
                "etcd.clientTrust=cluster",
                "certs.mode=certManager",
                "certs.certManager.issuerRef.name=x",
            ][..],
            "does not produce",
        ),
        (&["etcd.clientTrust=everyone"][..], "/etcd/clientTrust"),
    ] {
        let err = template_set(sets).expect_err(&format!("--set {sets:?} must fail"));
        assert!(
            err.contains(needle),
            "--set {sets:?}: expected {needle:?} in:\n{err}"
        );
    }
}
