//! A loopback stand-in for the Kubernetes API's Secrets endpoints, for running the chart's
//! certgen Job and renewal CronJob scripts on this machine.

use std::collections::BTreeMap;
use std::io::Write;

use crate::helm::NAMESPACE;

/// A loopback stand-in for the Kubernetes API's Secrets endpoints (the only ones the certgen Job
/// and the renewal CronJob call): GET .../secrets/NAME (200 or 404), POST .../secrets (201, or 409
/// when it exists) and PUT .../secrets/NAME (200, or 404 when it does not exist).
pub struct FakeSecretsApi {
    /// The loopback port it listens on.
    pub port: u16,
    /// What it holds and what it was asked, shared with the serving thread.
    pub state: std::sync::Arc<std::sync::Mutex<ApiState>>,
}

impl FakeSecretsApi {
    /// Listen on a loopback port and serve on a thread (that lives as long as the test).
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ApiState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                Self::serve(conn, &st);
            }
        });
        Self { port, state }
    }

    fn serve(mut conn: std::net::TcpStream, state: &std::sync::Mutex<ApiState>) {
        use std::io::{BufRead, BufReader, Read};
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let (mut len, mut auth) = (0usize, String::new());
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "authorization" => auth = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let (code, reply) = {
            let mut st = state.lock().unwrap();
            st.requests.push((method.clone(), path.clone(), auth));
            let prefix = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
            match (method.as_str(), path.strip_prefix(&prefix)) {
                ("GET", Some(rest)) if st.fail_gets.is_some() => {
                    let _ = rest;
                    (st.fail_gets.unwrap(), "{}".to_owned())
                }
                ("GET", Some(rest)) => match st.secrets.get(rest.trim_start_matches('/')) {
                    Some(s) => (200, s.to_string()),
                    None => (404, r#"{"kind":"Status","code":404}"#.to_owned()),
                },
                ("POST", Some("")) => match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(secret) => {
                        let name = secret["metadata"]["name"].as_str().unwrap_or("").to_owned();
                        match st.secrets.entry(name) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                (409, r#"{"kind":"Status","code":409}"#.to_owned())
                            }
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(secret.clone());
                                (201, secret.to_string())
                            }
                        }
                    }
                    Err(e) => (400, format!("{{\"message\":{:?}}}", e.to_string())),
                },
                ("PUT", Some(rest)) => {
                    let name = rest.trim_start_matches('/').to_owned();
                    match serde_json::from_slice::<serde_json::Value>(&body) {
                        Ok(secret) if secret["metadata"]["name"] != name.as_str() => {
                            (400, r#"{"message":"name in body differs"}"#.to_owned())
                        }
                        Ok(secret) => match st.secrets.get_mut(&name) {
                            Some(old) => {
                                *old = secret.clone();
                                (200, secret.to_string())
                            }
                            None => (404, r#"{"kind":"Status","code":404}"#.to_owned()),
                        },
                        Err(e) => (400, format!("{{\"message\":{:?}}}", e.to_string())),
                    }
                }
                _ => (404, "{}".to_owned()),
            }
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
    }
}

#[derive(Default)]
/// The Secrets a [`FakeSecretsApi`] holds and the requests it got.
pub struct ApiState {
    /// Secrets by name, as the JSON objects that were stored.
    pub secrets: BTreeMap<String, serde_json::Value>,
    /// (method, path, authorization header)
    pub requests: Vec<(String, String, String)>,
    /// Answer every GET with this status instead (an API server in trouble).
    pub fail_gets: Option<u16>,
}
