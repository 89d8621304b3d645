//! Running the real `helm` on the chart: lint and template with the default values and every
//! example values file, and the rendered manifests parsed into [`Rendered`].

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

use crate::manifest::str_at;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root above helm/chart-tests")
}

/// The chart under test, `helm/clustermesh`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("helm/clustermesh")
}

/// The path of `tool` on PATH; fails the test with the fix when it is missing.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{tool}` not found on PATH: run scripts/install-helm.sh (installs helm v4 and shellcheck)"
    );
}

/// A `helm` command; fails the test unless the `helm` on PATH is v4.
pub fn helm() -> Command {
    let helm = require_tool("helm");
    let out = Command::new(&helm)
        .args(["version", "--short"])
        .output()
        .expect("run helm version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with("v4."),
        "{} is helm {}, the chart is tested with helm v4: run scripts/install-helm.sh",
        helm.display(),
        version.trim()
    );
    Command::new(helm)
}

/// Run `cmd` to completion; fails the test when it cannot be started.
pub fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

/// The standard error of `out`, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One set of values the chart is rendered with: the defaults, or an example file.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the test output calls it: "default values" or the example's file name.
    pub name: String,
    /// The example values file; `None` for the defaults.
    pub values_file: Option<PathBuf>,
}

impl Case {
    /// The `-f FILE` arguments for helm (none for the defaults).
    pub fn values_args(&self) -> Vec<String> {
        match &self.values_file {
            Some(f) => vec!["-f".to_owned(), f.display().to_string()],
            None => Vec::new(),
        }
    }

    /// The example's values as YAML (empty mapping for the defaults).
    pub fn values(&self) -> Value {
        match &self.values_file {
            Some(f) => serde_yaml::from_str(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display())),
            None => Value::Mapping(Default::default()),
        }
    }
}

/// The defaults and every example values file under `helm/clustermesh/examples/`, sorted.
pub fn cases() -> Vec<Case> {
    let mut cases = vec![Case {
        name: "default values".to_owned(),
        values_file: None,
    }];
    let dir = chart_dir().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected several example values files in {}, found {files:?}",
        dir.display()
    );
    for f in files {
        cases.push(Case {
            name: f.file_name().unwrap().to_string_lossy().into_owned(),
            values_file: Some(f),
        });
    }
    cases
}

/// The namespace every test renders the chart into.
pub const NAMESPACE: &str = "clustermesh";

/// The release name every test renders the chart as.
pub const RELEASE: &str = "mesh";

/// `helm template` with extra arguments; Ok(stdout) or Err(stderr).
pub fn template(extra: &[String]) -> Result<String, String> {
    let mut cmd = helm();
    cmd.args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(extra);
    let out = run(cmd);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm output is UTF-8"))
    } else {
        Err(stderr(&out))
    }
}

/// `helm template` with `--set` for each of `sets`; Ok(stdout) or Err(stderr).
pub fn template_set(sets: &[&str]) -> Result<String, String> {
    let mut extra = Vec::new();
    for s in sets {
        extra.push("--set".to_owned());
        extra.push((*s).to_owned());
    }
    template(&extra)
}

/// Every document of a multi-document YAML stream, empty ones dropped.
pub fn parse_docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The rendered manifests of a case.
pub struct Rendered {
    /// The values it was rendered with.
    pub case: Case,
    /// Those values as YAML (`Null` when rendered with `--set`).
    pub values: Value,
    /// Every rendered object.
    pub docs: Vec<Value>,
}

impl Rendered {
    /// Render `case` (fails the test when helm refuses it).
    pub fn of(case: &Case) -> Self {
        let yaml = template(&case.values_args())
            .unwrap_or_else(|e| panic!("helm template with {} failed:\n{e}", case.name));
        Self {
            case: case.clone(),
            values: case.values(),
            docs: parse_docs(&yaml),
        }
    }

    /// Render every case of [`cases`].
    pub fn all() -> Vec<Self> {
        cases().iter().map(Self::of).collect()
    }

    /// Every rendered object of `kind`.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs
            .iter()
            .filter(move |d| str_at(d, &["kind"]) == Some(kind))
    }

    /// The one object of `kind` whose name ends with `name_suffix` (fails the test otherwise).
    pub fn one<'a>(&'a self, kind: &'a str, name_suffix: &str) -> &'a Value {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .filter(|d| str_at(d, &["metadata", "name"]).is_some_and(|n| n.ends_with(name_suffix)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: expected one {kind} named *{name_suffix}, found {}",
            self.case.name,
            found.len()
        );
        found[0]
    }

    /// The apiserver Deployment.
    pub fn apiserver(&self) -> &Value {
        self.one("Deployment", "-apiserver")
    }

    /// The node-sync DaemonSet.
    pub fn node_sync(&self) -> &Value {
        self.one("DaemonSet", "-node-sync")
    }
}
