//! The manifest-directory source: Kubernetes YAML (or JSON) files, several documents per file, watched by
//! polling modification times, so a changed file is published without a restart.
//!
//! A file that does not parse is reported with its path and line and skipped as a whole: the objects it held
//! at its last good read stay published until it is fixed or removed. An object defined in two files is taken
//! from the file that sorts last. Kinds the index does not read (Deployments, ConfigMaps, ...) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Source, SourceError, SourceEvent, SourceFuture};
use crate::objects::{ObjectRef, SourceObject};

/// A manifest that could not be read; the message names file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// 1-based line where the broken document or token starts.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Splits YAML text into documents at `---` lines; each with the 1-based line it starts on.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_sep {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            // Content after `--- ` on the same line belongs to the next document.
            let rest = line[3..].trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                cur.push_str(rest);
                cur.push('\n');
                start = i + 1;
            }
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs
}

fn blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

/// Removes serde_yaml's " at line N column M" (relative to the document; we report the file line instead).
fn strip_position(msg: &str) -> String {
    let Some(i) = msg.find(" at line ") else {
        return msg.to_owned();
    };
    let rest = &msg[i + " at line ".len()..];
    let after_line = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    let after = match after_line.strip_prefix(" column ") {
        Some(r) => r.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => after_line,
    };
    format!("{}{}", &msg[..i], after)
}

/// Parses every Kubernetes object of the kinds the index reads from one manifest file's text.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<SourceObject>, ManifestError> {
    let mut out = Vec::new();
    for (start, doc) in documents(text) {
        if blank(&doc) {
            continue;
        }
        let yaml: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| {
            let (line, col) = e
                .location()
                .map(|l| (start + l.line() - 1, l.column()))
                .unwrap_or((start, 0));
            let msg = strip_position(&e.to_string());
            ManifestError {
                file: file.to_owned(),
                line,
                message: format!("column {col}: invalid YAML: {msg}"),
            }
        })?;
        let doc_err = |message: String| ManifestError {
            file: file.to_owned(),
            line: start,
            message,
        };
        let json: serde_json::Value = serde_json::to_value(&yaml)
            .map_err(|e| doc_err(format!("not a Kubernetes object: {e}")))?;
        if json.is_null() {
            continue;
        }
        let items = if json.get("kind").and_then(|k| k.as_str()) == Some("List") {
            json.get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default()
        } else {
            vec![json]
        };
        for item in items {
            let kind = item
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_owned();
            let name = item
                .pointer("/metadata/name")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_owned();
            if kind.is_empty() {
                return Err(doc_err("document has no kind".into()));
            }
            match SourceObject::from_value(item) {
                Ok(Some(o)) => out.push(o),
                Ok(None) => debug!(file, kind, name, "ignoring a kind the index does not read"),
                Err(m) => return Err(doc_err(format!("{kind} {name:?}: {m}"))),
            }
        }
    }
    Ok(out)
}

/// Stamp of a file: changes when it is rewritten.
type Stamp = (Option<SystemTime>, u64);

#[derive(Debug, Default)]
struct FileState {
    stamp: Option<Stamp>,
    /// Objects of the last good read.
    objects: Vec<SourceObject>,
    error: Option<String>,
}

/// The state of a watched manifest directory; [`ManifestDir::poll`] rescans it and returns the events that bring
/// a consumer from the previous scan to this one.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    emitted: BTreeMap<ObjectRef, SourceObject>,
    dir_error: Option<String>,
}

fn is_manifest(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Stamp)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => continue, // vanished between listing and stat, or a dangling link
        };
        if meta.is_dir() {
            if !hidden {
                walk(&path, out)?;
            }
        } else if is_manifest(&path) {
            out.push((path, (meta.modified().ok(), meta.len())));
        }
    }
    Ok(())
}

impl ManifestDir {
    /// A directory not scanned yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            emitted: BTreeMap::new(),
            dir_error: None,
        }
    }

    /// Rescans the directory. `Err` when the directory itself cannot be read (nothing is emitted then: a
    /// directory that vanished is not taken as "every object was deleted").
    pub fn poll(&mut self) -> Result<Vec<SourceEvent>, String> {
        let mut events = Vec::new();
        let mut found = Vec::new();
        if let Err(e) = walk(&self.dir, &mut found) {
            let m = format!("manifest directory {}: {e}", self.dir.display());
            if self.dir_error.as_ref() != Some(&m) {
                self.dir_error = Some(m.clone());
            }
            return Err(m);
        }
        if self.dir_error.take().is_some() {
            events.push(SourceEvent::ErrorCleared {
                origin: self.dir.display().to_string(),
            });
        }
        let present: BTreeSet<PathBuf> = found.iter().map(|(p, _)| p.clone()).collect();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        let mut changed = !gone.is_empty();
        for p in gone {
            if let Some(st) = self.files.remove(&p)
                && st.error.is_some()
            {
                events.push(SourceEvent::ErrorCleared {
                    origin: p.display().to_string(),
                });
            }
        }
        for (path, stamp) in found {
            let st = self.files.entry(path.clone()).or_default();
            if st.stamp == Some(stamp) {
                continue;
            }
            st.stamp = Some(stamp);
            let origin = path.display().to_string();
            let parsed = std::fs::read(&path)
                .map_err(|e| ManifestError {
                    file: origin.clone(),
                    line: 0,
                    message: e.to_string(),
                })
                .and_then(|bytes| {
                    let text = String::from_utf8(bytes).map_err(|e| ManifestError {
                        file: origin.clone(),
                        line: 0,
                        message: format!("not UTF-8: {e}"),
                    })?;
                    parse_manifests(&origin, &text)
                });
            match parsed {
                Ok(objects) => {
                    if st.error.take().is_some() {
                        info!(file = %origin, "manifest file is valid again");
                        events.push(SourceEvent::ErrorCleared {
                            origin: origin.clone(),
                        });
                    }
                    if st.objects != objects {
                        st.objects = objects;
                        changed = true;
                    }
                }
                Err(e) => {
                    let m = e.to_string();
                    if st.error.as_ref() != Some(&m) {
                        warn!(file = %origin, line = e.line, error = %e.message, "skipping broken manifest file; its last good objects stay published");
                        st.error = Some(m.clone());
                        events.push(SourceEvent::Error {
                            origin: origin.clone(),
                            message: m,
                        });
                    }
                }
            }
        }
        if changed {
            let mut now: BTreeMap<ObjectRef, SourceObject> = BTreeMap::new();
            for st in self.files.values() {
                for o in &st.objects {
                    now.insert(o.object_ref(), o.clone());
                }
            }
            for r in self.emitted.keys() {
                if !now.contains_key(r) {
                    events.push(SourceEvent::Delete(r.clone()));
                }
            }
            for (r, o) in &now {
                if self.emitted.get(r) != Some(o) {
                    events.push(SourceEvent::Apply(o.clone()));
                }
            }
            self.emitted = now;
        }
        Ok(events)
    }
}

/// Watches a manifest directory by polling.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    /// The directory (read recursively; `*.yaml`, `*.yml`, `*.json`; hidden files skipped).
    pub dir: PathBuf,
    /// How often to rescan.
    pub interval: Duration,
}

impl ManifestSource {
    /// A source over `dir`, rescanned every 200 ms.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            interval: Duration::from_millis(200),
        }
    }
}

impl Source for ManifestSource {
    fn name(&self) -> String {
        format!("manifests:{}", self.dir.display())
    }

    fn run(&self, tx: mpsc::Sender<SourceEvent>) -> SourceFuture {
        let me = self.clone();
        Box::pin(async move {
            let mut state = ManifestDir::new(&me.dir);
            let mut synced = false;
            let mut last_dir_error = None;
            loop {
                let scan = state.poll();
                match scan {
                    Ok(events) => {
                        last_dir_error = None;
                        for ev in events {
                            tx.send(ev).await.map_err(|_| SourceError::Closed)?;
                        }
                        if !synced {
                            synced = true;
                            tx.send(SourceEvent::Synced { source: me.name() })
                                .await
                                .map_err(|_| SourceError::Closed)?;
                        }
                    }
                    Err(m) => {
                        if last_dir_error.as_ref() != Some(&m) {
                            warn!(error = %m, "cannot read the manifest directory");
                            last_dir_error = Some(m.clone());
                            tx.send(SourceEvent::Error {
                                origin: me.dir.display().to_string(),
                                message: m,
                            })
                            .await
                            .map_err(|_| SourceError::Closed)?;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(me.interval) => {}
                    _ = tx.closed() => return Err(SourceError::Closed),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjectKind;

    const GOOD: &str = "\
# a comment
apiVersion: v1
kind: Service
metadata:
  name: web
  annotations:
    clustermesh.io/global: \"true\"
spec:
  clusterIP: 10.96.0.10
  ports:
  - port: 80
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
ports:
- port: 8080
---
";

    #[test]
    fn several_documents_and_foreign_kinds() {
        let objs = parse_manifests("a.yaml", GOOD).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(
            objs[0].object_ref(),
            ObjectRef::new(ObjectKind::Service, "default", "web")
        );
        assert_eq!(
            objs[1].object_ref(),
            ObjectRef::new(ObjectKind::EndpointSlice, "shop", "web-1")
        );
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [b\n";
        let e = parse_manifests("dir/b.yaml", text).unwrap_err();
        assert_eq!(e.file, "dir/b.yaml");
        assert!(e.line >= 9, "{e}");
        assert!(e.to_string().starts_with("dir/b.yaml:"), "{e}");
    }

    #[test]
    fn a_type_error_names_the_document_line_and_object() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  ports:\n  - port: eighty\n";
        let e = parse_manifests("c.yaml", text).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("Service \"b\""), "{e}");
    }

    #[test]
    fn list_documents_are_unpacked() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: a\n- apiVersion: v1\n  kind: Node\n  metadata:\n    name: n1\n";
        assert_eq!(parse_manifests("l.yaml", text).unwrap().len(), 2);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("svc.yaml");
        std::fs::write(&f, GOOD).unwrap();
        let mut md = ManifestDir::new(dir.path());
        let ev = md.poll().unwrap();
        assert_eq!(ev.len(), 2);
        assert!(md.poll().unwrap().is_empty(), "no change, no events");
        std::fs::write(&f, "kind: Service\nmetadata: [\n").unwrap();
        let ev = md.poll().unwrap();
        assert!(
            matches!(&ev[..], [SourceEvent::Error { message, .. }] if message.contains("svc.yaml:"))
        );
        std::fs::write(&f, GOOD.replace("10.0.0.1", "10.0.0.2")).unwrap();
        let ev = md.poll().unwrap();
        assert!(matches!(ev[0], SourceEvent::ErrorCleared { .. }));
        assert!(matches!(
            &ev[1],
            SourceEvent::Apply(SourceObject::EndpointSlice(_))
        ));
        std::fs::remove_file(&f).unwrap();
        let ev = md.poll().unwrap();
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, SourceEvent::Delete(_))));
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_state() {
        let mut md = ManifestDir::new("/nonexistent/clustermesh-manifests");
        assert!(md.poll().unwrap_err().contains("/nonexistent"));
    }
}
