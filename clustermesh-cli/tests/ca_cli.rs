//! `clustermesh ca ...` and `clustermesh certs inspect`, run as a user would run them.

use std::path::Path;
use std::process::{Command, Output};

fn clustermesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .env_remove("CLUSTERMESH_CA_DIR")
        .env_remove("CLUSTERMESH_TRUST_DOMAIN")
        .output()
        .expect("run clustermesh")
}

fn ok(args: &[&str]) -> String {
    let out = clustermesh(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "clustermesh {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn fails(args: &[&str]) -> String {
    let out = clustermesh(args);
    assert!(!out.status.success(), "clustermesh {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn init_issue_inspect_rotate_retire() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let east = tmp.path().join("east");

    let out = ok(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--out",
        p(&ca),
    ]);
    assert!(
        out.contains("Created the root CA of trust domain mesh.example"),
        "{out}"
    );
    assert!(out.contains("SHA-256 fingerprint:"), "{out}");
    for f in ["root.crt", "root.key", "ca-bundle.pem", "trust-domain"] {
        assert!(ca.join(f).exists(), "{f}");
    }
    let err = fails(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--out",
        p(&ca),
    ]);
    assert!(err.contains("refusing to overwrite"), "{err}");

    let out = ok(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "east",
        "--id",
        "1",
        "--out",
        p(&east),
        "--san",
        "10.9.8.7",
        "--san",
        "etcd.east.example",
    ]);
    assert!(
        out.contains("Issued cluster east (id 1) of trust domain mesh.example"),
        "{out}"
    );
    for want in [
        "admin-east",
        "node-east",
        "remote-east",
        "spiffe://mesh.example/cluster/east/admin",
        "10.9.8.7",
        "etcd.east.example",
        "127.0.0.1",
        "::1",
        "localhost",
    ] {
        assert!(out.contains(want), "missing {want}: {out}");
    }

    let out = ok(&["certs", "inspect", p(&east.join("admin.crt"))]);
    for want in [
        "Certificate 1 of 2",
        "client certificate (etcd user \"admin-east\")",
        "Subject:             CN=admin-east",
        "Issuer:              CN=clustermesh intermediate CA east",
        "SPIFFE id:           spiffe://mesh.example/cluster/east/admin (cluster east, role admin)",
        "valid, expires in 36",
        "SHA-256 fingerprint: ",
        "intermediate CA certificate",
    ] {
        assert!(out.contains(want), "missing {want:?}: {out}");
    }
    let out = ok(&["certs", "inspect", p(&east.join("etcd-server.crt"))]);
    assert!(out.contains("server and client certificate"), "{out}");
    assert!(
        out.contains("IP addresses:        127.0.0.1, ::1, 10.9.8.7"),
        "{out}"
    );

    // Verify: trusted by the cluster's bundle, key matches; a foreign bundle and a wrong key are refused.
    let out = ok(&[
        "certs",
        "verify",
        "--bundle",
        p(&east.join("ca-bundle.pem")),
        "--key",
        p(&east.join("remote.key")),
        p(&east.join("remote.crt")),
    ]);
    assert!(
        out.contains("trusted:      yes") && out.contains("belongs to it") && out.contains("OK"),
        "{out}"
    );
    let out = ok(&[
        "certs",
        "verify",
        "--bundle",
        p(&east.join("ca-bundle.pem")),
        p(&east.join("etcd-server.crt")),
    ]);
    assert!(out.contains("server and client certificate"), "{out}");
    let err = fails(&[
        "certs",
        "verify",
        "--bundle",
        p(&east.join("ca-bundle.pem")),
        "--key",
        p(&east.join("node.key")),
        p(&east.join("remote.crt")),
    ]);
    assert!(
        err.contains("node.key does not match the certificate"),
        "{err}"
    );
    let other_ca = tmp.path().join("other-ca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "other.example",
        "--out",
        p(&other_ca),
    ]);
    let err = fails(&[
        "certs",
        "verify",
        "--bundle",
        p(&other_ca.join("ca-bundle.pem")),
        p(&east.join("remote.crt")),
    ]);
    assert!(
        err.contains("is not trusted by the CA bundle")
            && err.contains("not issued by a CA in the bundle"),
        "{err}"
    );

    // Rotate: the bundle holds two roots, the cluster dir gets it too.
    let out = ok(&["ca", "rotate", "--ca", p(&ca), "--cluster-dir", p(&east)]);
    assert!(out.contains("now holds 2 CA(s)"), "{out}");
    assert!(out.contains("(current root)"), "{out}");
    let bundle = ok(&["certs", "inspect", p(&east.join("ca-bundle.pem"))]);
    assert!(bundle.contains("Certificate 2 of 2"), "{bundle}");
    assert_eq!(
        bundle.matches("root CA certificate (self-signed)").count(),
        2,
        "{bundle}"
    );

    // Retire: back to one root.
    let out = ok(&["ca", "retire", "--ca", p(&ca), "--cluster-dir", p(&east)]);
    assert!(out.contains("Retired root"), "{out}");
    assert!(out.contains("now holds 1 CA(s)"), "{out}");
    let out = ok(&["ca", "retire", "--ca", p(&ca)]);
    assert!(out.contains("No old root to retire"), "{out}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--out",
        p(&ca),
    ]);

    let err = fails(&[
        "ca",
        "init",
        "--trust-domain",
        "Mesh Example",
        "--out",
        p(&tmp.path().join("x")),
    ]);
    assert!(err.contains("bad trust domain \"Mesh Example\""), "{err}");

    let bad_dir = tmp.path().join("bad");
    let out = p(&bad_dir);
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "East",
        "--id",
        "1",
        "--out",
        out,
    ]);
    assert!(err.contains("cluster name \"East\" contains 'E'"), "{err}");
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "default",
        "--id",
        "1",
        "--out",
        out,
    ]);
    assert!(err.contains("reserved"), "{err}");
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "east",
        "--id",
        "300",
        "--out",
        out,
    ]);
    assert!(err.contains("cluster id 300 is out of range"), "{err}");
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "east",
        "--id",
        "1",
        "--out",
        out,
        "--san",
        "no_underscores",
    ]);
    assert!(
        err.contains("bad subject alternative name \"no_underscores\""),
        "{err}"
    );

    let east = tmp.path().join("east");
    ok(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "east",
        "--id",
        "1",
        "--out",
        p(&east),
    ]);
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "west",
        "--id",
        "2",
        "--out",
        p(&east),
    ]);
    assert!(
        err.contains("it holds cluster east; refusing to overwrite it with cluster west"),
        "{err}"
    );

    let missing = tmp.path().join("missing-ca");
    let err = fails(&[
        "ca",
        "issue-cluster",
        "--ca",
        p(&missing),
        "--cluster",
        "east",
        "--id",
        "1",
        "--out",
        out,
    ]);
    assert!(
        err.contains("missing-ca/trust-domain does not exist"),
        "{err}"
    );

    let err = fails(&["certs", "inspect", p(&tmp.path().join("nope.pem"))]);
    assert!(err.contains("nope.pem does not exist"), "{err}");
    let corrupt = tmp.path().join("corrupt.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = fails(&["certs", "inspect", p(&corrupt)]);
    assert!(err.contains("corrupt.pem: corrupt PEM"), "{err}");

    std::fs::write(ca.join("root.key"), "garbage").unwrap();
    let err = fails(&["ca", "rotate", "--ca", p(&ca)]);
    assert!(err.contains("root.key: corrupt PEM"), "{err}");
}

#[test]
fn help_explains_the_commands() {
    let out = ok(&["ca", "--help"]);
    for want in [
        "init",
        "issue-cluster",
        "rotate",
        "retire",
        "federate",
        "renew",
    ] {
        assert!(out.contains(want), "{out}");
    }
    let out = ok(&["ca", "issue-cluster", "--help"]);
    assert!(
        out.contains("--san <DNS|IP>") && out.contains("remote-<cluster>"),
        "{out}"
    );
    let out = ok(&["ca", "renew", "--help"]);
    for want in [
        "--within",
        "--force",
        "--lifetime",
        "a third of their lifetime",
        "without a restart",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

/// `ca renew` as the chart's CronJob runs it: nothing due on a fresh directory, then forced and
/// by margin; the keys stay, the certificates change, a directory without leaves is an error.
#[test]
fn renew_reissues_due_leaves_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let west = tmp.path().join("west");
    let mut args = vec![
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--out",
        p(&ca),
    ];
    ok(&args);
    args = vec![
        "ca",
        "issue-cluster",
        "--ca",
        p(&ca),
        "--cluster",
        "west",
        "--id",
        "2",
    ];
    args.extend(["--out", p(&west), "--days", "90"]);
    ok(&args);
    assert!(west.join("etcd-root.crt").exists() && !west.join("root.crt").exists());
    let read = |f: &str| std::fs::read(west.join(f)).unwrap();
    let (node_crt, node_key) = (read("node.crt"), read("node.key"));

    // 90-day leaves are due 30 days before their end: nothing to do today.
    let out = ok(&["ca", "renew", "--cluster-dir", p(&west)]);
    assert!(
        out.contains("0 of 6 leaves of cluster west renewed"),
        "{out}"
    );
    assert!(
        out.contains("kept    node ") && out.contains("due 20"),
        "{out}"
    );
    assert_eq!(read("node.crt"), node_crt);

    let out = ok(&["ca", "renew", "--cluster-dir", p(&west), "--within", "100d"]);
    assert!(
        out.contains("6 of 6 leaves of cluster west renewed"),
        "{out}"
    );
    assert!(
        out.contains("renewed etcd-root") || out.contains("renewed root"),
        "{out}"
    );
    assert_ne!(read("node.crt"), node_crt, "certificate re-issued");
    assert_eq!(read("node.key"), node_key, "same key");
    let inspected = ok(&["certs", "inspect", p(&west.join("node.crt"))]);
    assert!(
        inspected.contains("CN=node-west") && inspected.contains("valid, expires in 89 days"),
        "{inspected}"
    );

    let out = ok(&[
        "ca",
        "renew",
        "--cluster-dir",
        p(&west),
        "--force",
        "--lifetime",
        "10d",
    ]);
    assert!(out.contains("6 of 6 leaves"), "{out}");
    let inspected = ok(&["certs", "inspect", p(&west.join("apiserver.crt"))]);
    assert!(inspected.contains("expires in 9 days"), "{inspected}");

    let err = fails(&[
        "ca",
        "renew",
        "--cluster-dir",
        p(&west),
        "--force",
        "--within",
        "1d",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(&["ca", "renew", "--cluster-dir", p(&tmp.path().join("nope"))]);
    assert!(err.contains("nope"), "{err}");
    let only = tmp.path().join("only-ca");
    std::fs::create_dir(&only).unwrap();
    for f in [
        "cluster.json",
        "ca-bundle.pem",
        "intermediate.crt",
        "intermediate.key",
    ] {
        std::fs::copy(west.join(f), only.join(f)).unwrap();
    }
    let err = fails(&["ca", "renew", "--cluster-dir", p(&only)]);
    assert!(err.contains("holds no leaf certificate to renew"), "{err}");
}
