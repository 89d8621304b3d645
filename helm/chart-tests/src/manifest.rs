//! Finding things in rendered manifests: values by path, containers, their args, flags,
//! volumes, mounts and env.

use serde_yaml::Value;

/// The value at `path` (mapping keys) under `v`.
pub fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    Some(cur)
}

/// The string at `path` under `v`.
pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

/// The sequence at `path` under `v` (empty when absent).
pub fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A sequence of strings (fails the test on anything else).
pub fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {s:?}"))
                .to_owned()
        })
        .collect()
}

/// The container `name` of a workload's pod template (fails the test when absent).
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    seq_at(workload, &["spec", "template", "spec", "containers"])
        .iter()
        .find(|c| str_at(c, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("no container {name} in {workload:?}"))
}

/// A container's `args`.
pub fn args(c: &Value) -> Vec<String> {
    strings(seq_at(c, &["args"]))
}

/// The value of `--flag=value` among a container's args.
pub fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("--{flag}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

/// The volume `name` of a workload's pod template (fails the test when absent).
pub fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    seq_at(workload, &["spec", "template", "spec", "volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("no volume {name} in {workload:?}"))
}

/// (volume name, mountPath, mountPropagation) of every volumeMount of a container.
pub fn mounts(c: &Value) -> Vec<(String, String, Option<String>)> {
    seq_at(c, &["volumeMounts"])
        .iter()
        .map(|m| {
            (
                str_at(m, &["name"]).unwrap().to_owned(),
                str_at(m, &["mountPath"]).unwrap().to_owned(),
                str_at(m, &["mountPropagation"]).map(str::to_owned),
            )
        })
        .collect()
}

/// The volume mounted at exactly `path` in container `c` of `workload`.
pub fn volume_mounted_at<'a>(workload: &'a Value, c: &Value, path: &str) -> &'a Value {
    let (name, _, _) = mounts(c)
        .into_iter()
        .find(|(_, p, _)| p == path)
        .unwrap_or_else(|| panic!("no volumeMount at {path} in container {c:?}"));
    volume(workload, &name)
}

/// The env value `name` of a container.
pub fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some(name))
        .and_then(|e| str_at(e, &["value"]))
}
