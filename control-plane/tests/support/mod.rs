//! Shared by the fleet end-to-end tests: real `edgefleet-server`,
//! `edgefleet-agent` and `edgefleet` processes on ephemeral ports, on SQLite
//! files or fresh PostgreSQL schemas.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_test_support::{KillOnDrop, sigterm_and_wait, testdata};
use serde_json::Value;

/// Where cargo put the workspace's binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A workspace binary, built on demand when this test runs alone.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.exists() {
        let package = match name {
            "edgefleet-agent" => "edgefleet-agent",
            "edgefleet" => "edgefleet-cli",
            _ => "edgefleet-control-plane",
        };
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("cargo build");
        assert!(status.success(), "cannot build {name}");
    }
    path
}

/// The database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A runtime for the tests that drive the server's gRPC APIs by hand.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A finished process's stderr, as text (for assertions and their messages).
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// The PostgreSQL server the tests use: `EDGEFLEET_TEST_POSTGRES_URL`, else
/// the local one with its `test` database.
pub fn postgres_base_url() -> String {
    std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A server on `db` with these flags, its data in `dir/server`, and with
/// PostgreSQL the fresh schema it uses (dropped with it: bound as
/// `let (_schema, server)`, the server is dropped first).
pub fn start_server(db: Db, dir: &std::path::Path, args: &[&str]) -> (Option<PgSchema>, Server) {
    let schema = (db == Db::Postgres).then(PgSchema::create);
    let url = schema.as_ref().map(|schema| schema.url.clone());
    let server = Server::start(&dir.join("server"), url.as_deref(), args);
    (schema, server)
}

/// A fresh PostgreSQL schema, dropped on drop.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub fn create() -> PgSchema {
        let name = format!("e2e_{}", hex::encode(rand::random::<[u8; 6]>()));
        let base = postgres_base_url();
        run_psql(&base, &format!("CREATE SCHEMA {name}"));
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        PgSchema { name, url }
    }
}

impl PgSchema {
    /// Runs SQL (several statements allowed) in this schema.
    pub fn execute(&self, sql: &str) {
        run_psql(&self.url, sql);
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            run_psql(
                &postgres_base_url(),
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            )
        });
    }
}

fn run_psql(url: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::{AssertSqlSafe, Connection, Executor};
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|err| panic!("PostgreSQL at {url}: {err}"));
        conn.execute(AssertSqlSafe(sql.to_string())).await.unwrap();
    });
}

/// Lines a child process wrote, collected by a thread.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn collect(&self, stream: impl std::io::Read + Send + 'static, echo: &'static str) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("EDGEFLEET_TEST_ECHO").is_some() {
                    eprintln!("[{echo}] {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {timeout:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}

/// A running process, killed on drop.
pub struct Process {
    pub child: KillOnDrop,
    pub stdout: Output,
    pub stderr: Output,
    name: &'static str,
}

/// How much of a process's log a failed test shows.
const LOG_TAIL_ON_FAILURE: usize = 40;

impl Drop for Process {
    /// A test that fails shows the end of each process's log: what the
    /// server and the agents were doing when it gave up.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = self.stderr.lines();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- the last {} lines of the {}'s stderr (pid {}) ---\n{}",
                tail.len(),
                self.name,
                self.child.id(),
                tail.join("\n")
            );
        }
    }
}

impl Process {
    pub fn spawn(mut command: Command, name: &'static str) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env(
                "EDGEFLEET_LOG",
                std::env::var("EDGEFLEET_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let stdout = Output::default();
        let stderr = Output::default();
        stdout.collect(child.stdout.take().unwrap(), name);
        stderr.collect(child.stderr.take().unwrap(), name);
        Process {
            child: KillOnDrop(child),
            stdout,
            stderr,
            name,
        }
    }

    /// Waits for a stderr line containing `needle`; fails fast, with the
    /// output, if the process exits first.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stderr.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the process exited ({status}) before printing {needle:?}; stderr:\n{}",
                    self.stderr.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {timeout:?}; stderr:\n{}",
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status within 10 s (None: SIGKILLed after that).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        sigterm_and_wait(&mut self.child, Duration::from_secs(10))
    }
}

pub fn field(line: &str, key: &str) -> String {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// A real `edgefleet-server` process.
pub struct Server {
    pub process: Process,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub agent_url: String,
    pub api_url: String,
    pub http_url: String,
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub extra_args: Vec<String>,
}

/// The server's three listen addresses.
#[derive(Clone, Copy)]
pub struct Listen {
    pub agent: SocketAddr,
    pub api: SocketAddr,
    pub http: SocketAddr,
}

impl Listen {
    /// Ephemeral ports on loopback.
    pub fn ephemeral() -> Listen {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Listen {
            agent: any,
            api: any,
            http: any,
        }
    }
}

impl Server {
    /// Starts a server on ephemeral ports.
    pub fn start(data_dir: &Path, database_url: Option<&str>, extra_args: &[&str]) -> Server {
        Server::start_on(data_dir, database_url, extra_args, Listen::ephemeral())
    }

    /// `edgefleet-server serve` with these settings, not yet spawned.
    pub fn command(
        data_dir: &Path,
        database_url: Option<&str>,
        extra_args: &[&str],
        Listen { agent, api, http }: Listen,
    ) -> Command {
        let mut command = Command::new(binary("edgefleet-server"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--agent-addr", &agent.to_string()])
            .args(["--api-addr", &api.to_string()])
            .args(["--http-addr", &http.to_string()])
            .args(extra_args);
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        command
    }

    pub fn start_on(
        data_dir: &Path,
        database_url: Option<&str>,
        extra_args: &[&str],
        listen: Listen,
    ) -> Server {
        let command = Server::command(data_dir, database_url, extra_args, listen);
        let mut process = Process::spawn(command, "server");
        let line = process.wait_for_stderr("edgefleet-server listening", Duration::from_secs(60));
        let agent_url = field(&line, "agent");
        let api_url = field(&line, "api");
        let http_url = field(&line, "http");
        let addr = |url: &str| url.rsplit("://").next().unwrap().parse().unwrap();
        Server {
            agent_addr: addr(&agent_url),
            api_addr: addr(&api_url),
            http_addr: addr(&http_url),
            process,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.map(str::to_string),
            agent_url,
            api_url,
            http_url,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts it again on the same ports and database.
    pub fn restart(&mut self) {
        self.process.kill();
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The port may be briefly unavailable after a kill.
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Server::start_on(
                    &self.data_dir,
                    self.database_url.as_deref(),
                    &extra,
                    Listen {
                        agent: self.agent_addr,
                        api: self.api_addr,
                        http: self.http_addr,
                    },
                )
            }));
            match attempt {
                Ok(server) => {
                    *self = server;
                    return;
                }
                Err(err) if Instant::now() > deadline => std::panic::resume_unwind(err),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The server's `ca.crt` (the fleet CA), which its operator API and
    /// HTTP listener present certificates of.
    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir.join("ca.crt")
    }

    /// `--server`, `--ca-cert` and `--token` for the CLI.
    pub fn cli_connection(&self) -> Vec<String> {
        let mut args = vec!["--server".to_string(), self.api_url.clone()];
        args.push("--ca-cert".into());
        args.push(self.ca_cert().display().to_string());
        args.push("--token".into());
        args.push(self.admin_token());
        args
    }

    /// A channel to the operator API: TLS trusting the fleet CA, or
    /// plaintext if the server was asked for it on loopback.
    pub async fn operator_channel(&self) -> tonic::transport::Channel {
        operator_channel(&self.api_url, &self.ca_cert()).await
    }

    /// A request to the server's HTTP listener, over TLS trusting the fleet
    /// CA (or plaintext if asked for); `(status, body)`.
    pub fn request(&self, method: &str, path: &str, json: Option<&Value>) -> Option<(u16, String)> {
        if self.http_url.starts_with("http://") {
            return http(self.http_addr, method, path, json);
        }
        let tcp =
            std::net::TcpStream::connect_timeout(&self.http_addr, Duration::from_secs(5)).ok()?;
        let mut stream = tls_client(tcp, &self.ca_cert());
        http_exchange(&mut stream, self.http_addr, method, path, json)
    }

    /// Runs the `edgefleet` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("edgefleet"))
            .args(self.cli_connection())
            .args(args)
            .env_remove("EDGEFLEET_SERVER")
            .env_remove("EDGEFLEET_TOKEN")
            .env_remove("EDGEFLEET_OUTPUT")
            .env_remove("EDGEFLEET_CONFIG")
            // No config file of whoever runs the tests.
            .env("XDG_CONFIG_HOME", &self.data_dir)
            .output()
            .unwrap()
    }

    /// Runs the CLI with its stdout on a pipe whose reader has already gone,
    /// as in `edgefleet devices list | head -0`.
    pub fn cli_into_closed_pipe(&self, args: &[&str]) -> std::process::Output {
        let mut child = Command::new(binary("edgefleet"))
            .args(self.cli_connection())
            .args(args)
            .env_remove("EDGEFLEET_SERVER")
            .env_remove("EDGEFLEET_TOKEN")
            .env_remove("EDGEFLEET_OUTPUT")
            .env_remove("EDGEFLEET_CONFIG")
            // No config file of whoever runs the tests.
            .env("XDG_CONFIG_HOME", &self.data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closing the read end before the CLI has its answer from the server
        // makes its first write fail with EPIPE.
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    }

    /// Runs the CLI and parses its JSON output; panics on failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let output = self.cli(&all);
        assert!(
            output.status.success(),
            "edgefleet {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    pub fn join_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["join-token", "create"];
        args.extend(extra);
        self.cli_json(&args)["token"].as_str().unwrap().to_string()
    }

    pub fn device(&self, id: &str) -> Value {
        self.cli_json(&["devices", "get", id])
    }

    pub fn metrics(&self) -> String {
        self.request("GET", "/metrics", None)
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

/// A plain HTTP/1.1 request over loopback; `(status, body)`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&Value>,
) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    http_exchange(&mut stream, addr, method, path, json)
}

/// A channel to an operator API at `url`: `https://` trusting the CA in
/// `ca_cert`, or `http://` (plaintext on loopback, when asked for).
pub async fn operator_channel(url: &str, ca_cert: &Path) -> tonic::transport::Channel {
    if url.starts_with("http://") {
        return tonic::transport::Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
    }
    let ca_pem = std::fs::read_to_string(ca_cert).unwrap();
    let config = edgefleet_pki::ca_client_tls_config(&ca_pem).unwrap();
    edgefleet_pki::connect_tls(url, config, Duration::from_secs(10))
        .await
        .unwrap()
}

/// `tcp` wrapped in a TLS client (HTTP/1.1) trusting the CA in `ca_cert`,
/// for the server name 127.0.0.1.
pub fn tls_client(
    tcp: std::net::TcpStream,
    ca_cert: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let ca_pem = std::fs::read_to_string(ca_cert).unwrap();
    let mut config = (*edgefleet_pki::ca_client_tls_config(&ca_pem).unwrap()).clone();
    // HTTP/1.1, offered by name as Python's urllib3 and `curl --http1.1` do.
    config.alpn_protocols = vec![edgefleet_pki::ALPN_HTTP11.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(config.into(), name).unwrap();
    rustls::StreamOwned::new(connection, tcp)
}

/// One HTTP/1.1 request on `stream` (`connection: close`); `(status, body)`.
fn http_exchange(
    stream: &mut (impl std::io::Read + std::io::Write + AsTcp),
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&Value>,
) -> Option<(u16, String)> {
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let body = json.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        // A TLS connection closed without close_notify.
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(_) => return None,
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The TCP socket under a stream (for its read timeout).
pub trait AsTcp {
    fn tcp(&self) -> &std::net::TcpStream;
}

impl AsTcp for std::net::TcpStream {
    fn tcp(&self) -> &std::net::TcpStream {
        self
    }
}

impl AsTcp for rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    fn tcp(&self) -> &std::net::TcpStream {
        &self.sock
    }
}

/// `edgefleet-agent enroll`; returns the process output.
pub fn enroll(server_url: &str, token: &str, state_dir: &Path) -> std::process::Output {
    Command::new(binary("edgefleet-agent"))
        .args([
            "enroll",
            "--server",
            server_url,
            "--token",
            token,
            "--state-dir",
        ])
        .arg(state_dir)
        .env("EDGEFLEET_LOG", "warn")
        .output()
        .unwrap()
}

/// Enrolls and returns the device id.
pub fn enroll_ok(server: &Server, token: &str, state_dir: &Path) -> String {
    let output = enroll(&server.agent_url, token, state_dir);
    assert!(
        output.status.success(),
        "enroll failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(state_dir.join("identity/enrollment.json")).unwrap();
    let enrollment: Value = serde_json::from_str(&text).unwrap();
    enrollment["device_id"].as_str().unwrap().to_string()
}

/// A real `edgefleet-agent run` process (tract, light on memory).
pub struct Agent {
    pub process: Process,
    pub state_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub extra_args: Vec<String>,
}

impl Agent {
    pub fn run(state_dir: &Path, extra_args: &[&str]) -> Agent {
        let mut args = vec!["--runtime", "tract"];
        args.extend(extra_args);
        Agent::run_with(state_dir, &args)
    }

    /// Like `run`, but the caller picks every flag (e.g. the runtime).
    pub fn run_with(state_dir: &Path, extra_args: &[&str]) -> Agent {
        let mut command = Command::new(binary("edgefleet-agent"));
        command
            .arg("run")
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(extra_args);
        let mut process = Process::spawn(command, "agent");
        let line = process.wait_for_stderr("edgefleet-agent listening", Duration::from_secs(60));
        Agent {
            grpc_addr: field(&line, "grpc").parse().unwrap(),
            http_addr: field(&line, "http").parse().unwrap(),
            process,
            state_dir: state_dir.to_path_buf(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn restart(&mut self) {
        self.process.kill();
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        *self = Agent::run_with(&self.state_dir, &extra);
    }

    /// One inference on whatever version of `model` is served, with zeros
    /// shaped by its metadata (dynamic dimensions as 1); true on success.
    pub fn infer_zeros(&self, model: &str) -> bool {
        let Some((200, body)) = http(self.http_addr, "GET", &format!("/v2/models/{model}"), None)
        else {
            return false;
        };
        let Ok(metadata) = serde_json::from_str::<Value>(&body) else {
            return false;
        };
        let inputs: Vec<Value> = metadata["inputs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|input| {
                let shape: Vec<i64> = input["shape"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|d| d.as_i64().unwrap_or(1).max(1))
                    .collect();
                let count: i64 = shape.iter().product();
                serde_json::json!({
                    "name": input["name"],
                    "datatype": input["datatype"],
                    "shape": shape,
                    "data": vec![0; count as usize],
                })
            })
            .collect();
        let body = serde_json::json!({ "inputs": inputs });
        matches!(
            http(
                self.http_addr,
                "POST",
                &format!("/v2/models/{model}/infer"),
                Some(&body)
            ),
            Some((200, _))
        )
    }

    /// The versions of a model the agent serves (from its HTTP metadata).
    pub fn served_versions(&self, model: &str) -> Vec<u64> {
        match http(self.http_addr, "GET", &format!("/v2/models/{model}"), None) {
            Some((200, body)) => serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| {
                    v["versions"].as_array().map(|versions| {
                        versions
                            .iter()
                            .filter_map(|x| x.as_str().and_then(|s| s.parse().ok()))
                            .collect()
                    })
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// One inference over HTTP on the `mlp` fixture; true if it succeeded.
    pub fn infer_mlp(&self) -> bool {
        let data = vec![0.5f32; 16];
        let body = serde_json::json!({
            "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": data}]
        });
        matches!(
            http(self.http_addr, "POST", "/v2/models/mlp/infer", Some(&body)),
            Some((200, _))
        )
    }
}

/// Copies a fixture model into the agent's model cache as version 1.
pub fn install_fixture(state_dir: &Path, name: &str) {
    let dir = state_dir.join("models").join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        testdata()
            .join("models")
            .join(name)
            .join("1")
            .join("model.onnx"),
        dir.join("model.onnx"),
    )
    .unwrap();
}

/// The store the server uses, opened directly, to check what it holds.
pub fn open_store(
    runtime: &tokio::runtime::Runtime,
    server: &Server,
) -> std::sync::Arc<dyn edgefleet_control_plane::store::Store> {
    runtime
        .block_on(edgefleet_control_plane::store::open(
            server.database_url.as_deref(),
            &server.data_dir,
        ))
        .unwrap()
}

/// A 10 s telemetry batch ending at `end_unix_ms` that says model "m"
/// version 1 served `sequence * 10` requests (no device id: as agents send
/// batches on a session).
pub fn model_batch(
    sequence: u64,
    end_unix_ms: u64,
) -> edgefleet_proto::edgefleet::v1::TelemetryBatch {
    use edgefleet_proto::edgefleet::v1 as pb;
    pb::TelemetryBatch {
        sequence,
        start_unix_ms: end_unix_ms - 10_000,
        end_unix_ms,
        models: vec![pb::ModelTelemetry {
            name: "m".into(),
            version: 1,
            requests: sequence * 10,
            ..Default::default()
        }],
        ..Default::default()
    }
}
