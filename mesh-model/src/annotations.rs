//! The Service annotations that make a service global.
//!
//! | meaning | ClusterMesh | Cilium | older Cilium |
//! |---|---|---|---|
//! | global | `clustermesh.io/global` | `service.cilium.io/global` | `io.cilium/global-service` |
//! | shared (default true) | `clustermesh.io/shared` | `service.cilium.io/shared` | `io.cilium/shared-service` |
//! | affinity `local\|remote\|none` | `clustermesh.io/affinity` | `service.cilium.io/affinity` | `io.cilium/service-affinity` |
//! | failover order `c2,c3` | `clustermesh.io/failover-order` | | |
//! | health check `tcp\|http:/path` | `clustermesh.io/health-check` | | |
//! | probe port (TCP, on each endpoint) | `clustermesh.io/health-check-port` | | |
//!
//! Booleans are `true` or `false` (any case). Where several forms of one setting are present they must
//! agree; if they do not, the service is refused with an error naming both, rather than silently picking
//! one. Unknown annotations are ignored. Every error names the annotation and the value.

use std::collections::BTreeMap;

use crate::cluster::ClusterName;
use crate::values::{Affinity, HealthCheck};

/// `clustermesh.io/global`
pub const GLOBAL: &str = "clustermesh.io/global";
/// `clustermesh.io/shared`
pub const SHARED: &str = "clustermesh.io/shared";
/// `clustermesh.io/affinity`
pub const AFFINITY: &str = "clustermesh.io/affinity";
/// `clustermesh.io/failover-order`
pub const FAILOVER_ORDER: &str = "clustermesh.io/failover-order";
/// `clustermesh.io/health-check`
pub const HEALTH_CHECK: &str = "clustermesh.io/health-check";
/// `clustermesh.io/health-check-port`: the TCP port of each endpoint the health check probes
/// instead of the backend's own port (how a UDP-only service gets health-checked).
pub const HEALTH_CHECK_PORT: &str = "clustermesh.io/health-check-port";

const GLOBAL_FORMS: [&str; 3] = [
    GLOBAL,
    "service.cilium.io/global",
    "io.cilium/global-service",
];
const SHARED_FORMS: [&str; 3] = [
    SHARED,
    "service.cilium.io/shared",
    "io.cilium/shared-service",
];
const AFFINITY_FORMS: [&str; 3] = [
    AFFINITY,
    "service.cilium.io/affinity",
    "io.cilium/service-affinity",
];

/// An annotation with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// The value is not valid for the annotation.
    #[error("annotation {annotation} has invalid value {value:?}: {expected}")]
    Invalid {
        /// The annotation.
        annotation: String,
        /// Its value.
        value: String,
        /// What would be valid.
        expected: String,
    },
    /// Two forms of the same setting disagree.
    #[error(
        "annotations {first}={first_value:?} and {second}={second_value:?} disagree; remove one"
    )]
    Conflict {
        /// The first annotation.
        first: String,
        /// Its value.
        first_value: String,
        /// The second annotation.
        second: String,
        /// Its value.
        second_value: String,
    },
}

impl AnnotationError {
    /// The annotation the error is about.
    pub fn annotation(&self) -> &str {
        match self {
            AnnotationError::Invalid { annotation, .. } => annotation,
            AnnotationError::Conflict { first, .. } => first,
        }
    }
}

/// What a Service's annotations say about the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalServiceAnnotations {
    /// The service is global.
    pub global: bool,
    /// This cluster shares its backends.
    pub shared: bool,
    /// Affinity.
    pub affinity: Affinity,
    /// Failover order.
    pub failover_order: Vec<ClusterName>,
    /// Health check.
    pub health_check: HealthCheck,
    /// The TCP port probed instead of each backend's own port.
    pub health_check_port: Option<u16>,
}

impl Default for GlobalServiceAnnotations {
    fn default() -> Self {
        Self {
            global: false,
            shared: true,
            affinity: Affinity::None,
            failover_order: Vec::new(),
            health_check: HealthCheck::Tcp,
            health_check_port: None,
        }
    }
}

/// The value of the first form present, after checking that every present form agrees.
fn pick<'a, T: PartialEq>(
    ann: &'a BTreeMap<String, String>,
    forms: &[&str],
    parse: impl Fn(&str, &str) -> Result<T, AnnotationError>,
) -> Result<Option<T>, AnnotationError> {
    let mut found: Option<(&str, &'a str, T)> = None;
    for form in forms {
        if let Some(v) = ann.get(*form) {
            let parsed = parse(form, v)?;
            match &found {
                None => found = Some((form, v, parsed)),
                Some((f, fv, fp)) if *fp != parsed => {
                    return Err(AnnotationError::Conflict {
                        first: (*f).to_owned(),
                        first_value: (*fv).to_owned(),
                        second: (*form).to_owned(),
                        second_value: v.clone(),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(found.map(|(_, _, v)| v))
}

fn invalid(annotation: &str, value: &str, expected: &str) -> AnnotationError {
    AnnotationError::Invalid {
        annotation: annotation.to_owned(),
        value: value.to_owned(),
        expected: expected.to_owned(),
    }
}

fn parse_bool(annotation: &str, value: &str) -> Result<bool, AnnotationError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(annotation, value, "expected \"true\" or \"false\"")),
    }
}

fn parse_affinity(annotation: &str, value: &str) -> Result<Affinity, AnnotationError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "local" => Ok(Affinity::Local),
        "remote" => Ok(Affinity::Remote),
        "none" | "" => Ok(Affinity::None),
        _ => Err(invalid(annotation, value, "expected local, remote or none")),
    }
}

fn parse_failover_order(
    annotation: &str,
    value: &str,
) -> Result<Vec<ClusterName>, AnnotationError> {
    let mut out: Vec<ClusterName> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let name = ClusterName::new(part).map_err(|e| {
            invalid(
                annotation,
                value,
                &format!("a comma-separated list of cluster names: {e}"),
            )
        })?;
        if out.contains(&name) {
            return Err(invalid(
                annotation,
                value,
                &format!("cluster {part:?} is listed twice"),
            ));
        }
        out.push(name);
    }
    Ok(out)
}

fn parse_port(annotation: &str, value: &str) -> Result<u16, AnnotationError> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(annotation, value, "expected a port number 1-65535")),
    }
}

fn parse_health_check(annotation: &str, value: &str) -> Result<HealthCheck, AnnotationError> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("tcp") {
        return Ok(HealthCheck::Tcp);
    }
    match v.split_once(':') {
        Some((scheme, path)) if scheme.eq_ignore_ascii_case("http") && path.starts_with('/') => {
            if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    annotation,
                    value,
                    "the path must not contain spaces",
                ));
            }
            Ok(HealthCheck::Http {
                path: path.to_owned(),
            })
        }
        _ => Err(invalid(
            annotation,
            value,
            "expected \"tcp\" or \"http:/path\"",
        )),
    }
}

/// Read the mesh annotations of a Service.
pub fn parse(
    annotations: &BTreeMap<String, String>,
) -> Result<GlobalServiceAnnotations, AnnotationError> {
    let d = GlobalServiceAnnotations::default();
    Ok(GlobalServiceAnnotations {
        global: pick(annotations, &GLOBAL_FORMS, parse_bool)?.unwrap_or(d.global),
        shared: pick(annotations, &SHARED_FORMS, parse_bool)?.unwrap_or(d.shared),
        affinity: pick(annotations, &AFFINITY_FORMS, parse_affinity)?.unwrap_or(d.affinity),
        failover_order: pick(annotations, &[FAILOVER_ORDER], parse_failover_order)?
            .unwrap_or_default(),
        health_check: pick(annotations, &[HEALTH_CHECK], parse_health_check)?.unwrap_or_default(),
        health_check_port: pick(annotations, &[HEALTH_CHECK_PORT], parse_port)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_absent() {
        let a = parse(&ann(&[("unrelated", "x")])).unwrap();
        assert_eq!(a, GlobalServiceAnnotations::default());
        assert!(!a.global && a.shared && a.affinity == Affinity::None);
    }

    #[test]
    fn every_form_of_global_shared_affinity() {
        for (g, s, af) in [
            (GLOBAL, SHARED, AFFINITY),
            (
                "service.cilium.io/global",
                "service.cilium.io/shared",
                "service.cilium.io/affinity",
            ),
            (
                "io.cilium/global-service",
                "io.cilium/shared-service",
                "io.cilium/service-affinity",
            ),
        ] {
            let a = parse(&ann(&[(g, "true"), (s, "false"), (af, "local")])).unwrap();
            assert!(a.global, "{g}");
            assert!(!a.shared, "{s}");
            assert_eq!(a.affinity, Affinity::Local, "{af}");
            let a = parse(&ann(&[(g, "TRUE"), (af, "Remote")])).unwrap();
            assert!(a.global && a.shared);
            assert_eq!(a.affinity, Affinity::Remote);
            let a = parse(&ann(&[(g, "false"), (af, "none")])).unwrap();
            assert!(!a.global);
            assert_eq!(a.affinity, Affinity::None);
        }
    }

    #[test]
    fn a_health_check_port_is_a_port_number() {
        let a = parse(&ann(&[(HEALTH_CHECK_PORT, "8081")])).unwrap();
        assert_eq!(a.health_check_port, Some(8081));
        assert_eq!(parse(&ann(&[])).unwrap().health_check_port, None);
        for bad in ["0", "65536", "http", "-1"] {
            let e = parse(&ann(&[(HEALTH_CHECK_PORT, bad)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(HEALTH_CHECK_PORT) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn failover_order_and_health_check() {
        let a = parse(&ann(&[
            (GLOBAL, "true"),
            (FAILOVER_ORDER, "c3, c2"),
            (HEALTH_CHECK, "http:/healthz"),
        ]))
        .unwrap();
        assert_eq!(
            a.failover_order,
            vec![
                ClusterName::new("c3").unwrap(),
                ClusterName::new("c2").unwrap()
            ]
        );
        assert_eq!(
            a.health_check,
            HealthCheck::Http {
                path: "/healthz".into()
            }
        );
        let a = parse(&ann(&[(HEALTH_CHECK, "TCP")])).unwrap();
        assert_eq!(a.health_check, HealthCheck::Tcp);
    }

    #[test]
    fn invalid_values_name_the_annotation_and_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            (GLOBAL, "yes", "\"true\" or \"false\""),
            ("service.cilium.io/global", "1", "\"true\" or \"false\""),
            ("io.cilium/shared-service", "maybe", "\"true\" or \"false\""),
            (AFFINITY, "nearest", "local, remote or none"),
            (
                "io.cilium/service-affinity",
                "LOCALLY",
                "local, remote or none",
            ),
            (FAILOVER_ORDER, "c2,C3", "cluster name"),
            (FAILOVER_ORDER, "c2,c2", "listed twice"),
            (FAILOVER_ORDER, "c2,default", "reserved"),
            (HEALTH_CHECK, "http:healthz", "http:/path"),
            (HEALTH_CHECK, "grpc", "http:/path"),
        ];
        for (a, v, expected) in cases {
            let e = parse(&ann(&[(a, v)])).unwrap_err();
            assert_eq!(e.annotation(), *a);
            let msg = e.to_string();
            assert!(msg.contains(a) && msg.contains(&format!("{v:?}")), "{msg}");
            assert!(msg.contains(expected), "{msg} lacks {expected}");
        }
    }

    #[test]
    fn forms_that_disagree_are_refused_forms_that_agree_are_fine() {
        let e = parse(&ann(&[
            (GLOBAL, "true"),
            ("service.cilium.io/global", "false"),
        ]))
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(GLOBAL) && msg.contains("service.cilium.io/global"),
            "{msg}"
        );
        let a = parse(&ann(&[
            (AFFINITY, "local"),
            ("io.cilium/service-affinity", "LOCAL"),
        ]))
        .unwrap();
        assert_eq!(a.affinity, Affinity::Local);
    }
}
