//! Real `redis-server` processes for tests: a single node (optionally with a password or TLS) and a
//! three-master cluster, each on free loopback ports, killed by PID when dropped.
//!
//! Self-contained (no `super::` items) so it can be used as `support::redis` or included on its own with
//! `#[path = "support/redis.rs"] mod redis_support;`.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a redis-server may take to answer PING (or a cluster to agree) before the test fails.
pub const REDIS_STARTUP: Duration = Duration::from_secs(20);

/// The redis-server binary: `$TOLLGATE_REDIS_SERVER`, else `redis-server` on the PATH.
pub fn redis_server_binary() -> PathBuf {
    match std::env::var_os("TOLLGATE_REDIS_SERVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("redis-server"),
    }
}

/// The redis-cli binary: `$TOLLGATE_REDIS_CLI`, else `redis-cli` on the PATH.
pub fn redis_cli_binary() -> PathBuf {
    match std::env::var_os("TOLLGATE_REDIS_CLI") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("redis-cli"),
    }
}

fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Files for a TLS redis-server: a private CA and a server certificate for 127.0.0.1 and localhost.
pub struct TlsFiles {
    /// The CA certificate clients must trust (PEM).
    pub ca_cert: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Generates the CA and server certificate with the `openssl` command line in `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl (is it installed?)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write server.ext");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tollgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        TlsFiles {
            ca_cert: dir.join("ca.crt"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
        }
    }
}

/// How to start a [`RedisServer`].
#[derive(Default)]
pub struct RedisConfig {
    /// `--requirepass`.
    pub password: Option<String>,
    /// Serve TLS only (plain port disabled), with these files.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `--cluster-enabled yes` with a node file in the server's folder.
    pub cluster: bool,
}

/// A running `redis-server`; `stop`/`start` keep its port, drop kills it by PID.
pub struct RedisServer {
    /// The loopback port it listens on (TLS or plain).
    pub port: u16,
    config: RedisConfig,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// A plain node without a password.
    pub fn start() -> RedisServer {
        Self::start_with(RedisConfig::default())
    }

    /// A node started with `config`, on a free port (retried if the port was taken meanwhile).
    pub fn start_with(config: RedisConfig) -> RedisServer {
        let dir = tempfile::tempdir().expect("redis tempdir");
        let mut server = RedisServer {
            port: 0,
            config,
            child: None,
            dir,
        };
        let mut last = String::new();
        for _ in 0..3 {
            server.port = free_loopback_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(logs) => last = logs,
            }
        }
        panic!("redis-server kept failing to start; its last log:\n{last}");
    }

    /// `redis://[:password@]127.0.0.1:port` (or `rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.config.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL, by PID) and reaps it; the port is kept for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + REDIS_STARTUP;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(logs) if Instant::now() >= deadline => {
                    panic!(
                        "redis-server did not restart on port {}:\n{logs}",
                        self.port
                    )
                }
                // The old socket may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs one command through `redis-cli` (plain servers only) and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        assert!(self.config.tls.is_none(), "cli() speaks plain TCP only");
        let mut cmd = Command::new(redis_cli_binary());
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.config.password {
            cmd.env("REDISCLI_AUTH", p);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("redis.log");
        let _ = std::fs::remove_file(&log_path);
        let port = self.port.to_string();
        let mut cmd = Command::new(redis_server_binary());
        cmd.current_dir(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .args(["--logfile", &log_path.to_string_lossy()]);
        match &self.config.tls {
            Some((cert, key, ca)) => {
                cmd.args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cert-file", &cert.to_string_lossy()])
                    .args(["--tls-key-file", &key.to_string_lossy()])
                    .args(["--tls-ca-cert-file", &ca.to_string_lossy()])
                    .args(["--tls-auth-clients", "no"]);
                if self.config.cluster {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
            None => {
                cmd.args(["--port", &port]);
            }
        }
        if let Some(p) = &self.config.password {
            cmd.args(["--requirepass", p]);
            if self.config.cluster {
                cmd.args(["--masterauth", p]);
            }
        }
        if self.config.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "2000"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", redis_server_binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_STARTUP;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if self.answers_ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = self.log();
                self.stop();
                return Err(format!("no PONG within {REDIS_STARTUP:?}:\n{logs}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// A PING over plain TCP (or, for TLS, just an accepted connection plus a log line saying ready).
    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.config.tls.is_some() {
            return self.log().contains("Ready to accept connections");
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut request = String::new();
        if let Some(p) = &self.config.password {
            request.push_str(&format!("AUTH {p}\r\n"));
        }
        request.push_str("PING\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&answer).contains("+PONG") {
                        return true;
                    }
                }
            }
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- redis-server {} log ---\n{}", self.port, self.log());
        }
        self.stop();
    }
}

/// Three masters (no replicas) joined with `redis-cli --cluster create`, all slots covered.
pub struct RedisCluster {
    /// The nodes, in creation order.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes and creates the cluster; waits until every node reports ok.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(RedisConfig {
                    cluster: true,
                    ..RedisConfig::default()
                })
            })
            .collect();
        let mut cmd = Command::new(redis_cli_binary());
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = cmd
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + REDIS_STARTUP;
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "cluster did not reach cluster_state:ok in {REDIS_STARTUP:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Comma-separated node URLs for the cluster client.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `redis-cli -c` (cluster mode: follows redirections) on the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(redis_cli_binary())
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[0].port.to_string(),
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli -c");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Sum of `calls` over every command in `INFO commandstats` (plain servers only).
pub fn total_commands(server: &RedisServer) -> u64 {
    parse_commandstats(&server.cli(&["INFO", "commandstats"]))
}

/// `calls` of one command (lowercase name, e.g. `evalsha`) in `INFO commandstats` (plain servers only).
pub fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:");
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Sum of `calls=` over the `cmdstat_*` lines of an `INFO commandstats` answer.
pub fn parse_commandstats(info: &str) -> u64 {
    info.lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Writes `contents` to `dir/name` and returns the path (for certificate bundles and similar).
pub fn write_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut f = File::create(&path).expect("create file");
    f.write_all(contents).expect("write file");
    path
}
