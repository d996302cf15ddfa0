//! A real PostgreSQL server for tests: a fresh cluster (`initdb`) in a temporary folder, on a free loopback
//! port, with its Unix socket in that folder too. Its postmaster and every backend are killed by PID when
//! it drops, and its log is printed when the test is failing.
//!
//! The binaries come from `$TOLLGATE_PG_BIN` (what `scripts/test` exports), else the highest
//! `/usr/lib/postgresql/*/bin`, else the PATH. A system server, if one runs, is neither started nor used.
//!
//! initdb and postgres refuse to run as root, and CI and the sessions run as root: then both run as the
//! unprivileged `postgres` user (Debian's package creates it; `tollgate-pg` is created when it is missing),
//! through `setpriv`, which execs, so the spawned child is the postmaster itself. The temporary folder is
//! chowned to that user; the clients (`psql`, `pg_isready`) run as the caller, over TCP with trust auth.
//!
//! Self-contained (no `super::` items) so it can be used as `support::postgres` or included on its own with
//! `#[path = "support/postgres.rs"] mod pg;`.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long initdb, a first start, or a restart with crash recovery may take before the test fails.
pub const PG_STARTUP: Duration = Duration::from_secs(30);

/// How long a fast shutdown (SIGINT) may take on drop before the postmaster and its backends are SIGKILLed.
pub const PG_SHUTDOWN: Duration = Duration::from_secs(10);

/// How long SIGKILLed processes may take to disappear and the port to stop accepting connections.
const PG_GONE: Duration = Duration::from_secs(10);

/// How many lines of the server log a failing test prints.
const LOG_TAIL_LINES: usize = 80;

/// The superuser role initdb creates (`-U`); trust auth, so no password.
pub const PG_USER: &str = "tollgate";

/// The database `start` creates and [`PostgresServer::url`] names.
pub const PG_DATABASE: &str = "tollgate";

/// The system user created to run the server as when the tests run as root and `postgres` does not exist.
const FALLBACK_SERVER_USER: &str = "tollgate-pg";

/// The folder holding initdb, postgres, psql and pg_isready: `$TOLLGATE_PG_BIN`, else the highest-version
/// `/usr/lib/postgresql/*/bin` that has initdb and postgres; `None` means "look them up on the PATH".
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TOLLGATE_PG_BIN")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        // "15", "16", "9.6": compared as numbers, part by part.
        let Some(version) = name
            .split('.')
            .map(|part| part.parse::<u64>().ok())
            .collect::<Option<Vec<u64>>>()
        else {
            continue;
        };
        let bin = entry.path().join("bin");
        if !bin.join("initdb").is_file() || !bin.join("postgres").is_file() {
            continue;
        }
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin)
}

/// The unprivileged account initdb and postgres run as when the tests run as root.
#[derive(Debug)]
struct ServerUser {
    /// Its login name (for messages).
    name: String,
    /// Its user ID.
    uid: u32,
    /// Its primary group ID.
    gid: u32,
}

/// The effective user ID of this process: the second field of the `Uid:` line of /proc/self/status.
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .expect("no effective uid in /proc/self/status")
}

/// `name`'s user and primary group IDs (`id -u`, `id -g`), or `None` when there is no such user.
fn lookup_user(name: &str) -> Option<ServerUser> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some(ServerUser {
        name: name.to_owned(),
        uid: id("-u")?,
        gid: id("-g")?,
    })
}

/// Who initdb and postgres run as: `None` (this process's user) unless it is root; then `postgres`, or
/// `tollgate-pg`, created with `useradd --system --no-create-home` when neither exists. Looked up once.
fn server_user() -> Option<&'static ServerUser> {
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    USER.get_or_init(|| {
        if effective_uid() != 0 {
            return None;
        }
        if let Some(user) = lookup_user("postgres").or_else(|| lookup_user(FALLBACK_SERVER_USER)) {
            return Some(user);
        }
        let _ = Command::new("useradd")
            .args(["--system", "--no-create-home", FALLBACK_SERVER_USER])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Another test process may have created it first (useradd then fails): look it up either way.
        Some(lookup_user(FALLBACK_SERVER_USER).unwrap_or_else(|| {
            panic!(
                "running as root, there is no `postgres` user and `useradd --system --no-create-home \
                 {FALLBACK_SERVER_USER}` did not create one (initdb and postgres refuse to run as root)"
            )
        }))
    })
    .as_ref()
}

/// A loopback TCP port that was free a moment ago (the OS picks it).
fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A temporary folder the server user can write in (the caller's own, or chowned to `user` when root).
///
/// As root the folder is tried under the temp dir first, then under /tmp: a `$TMPDIR` inside /root cannot
/// be entered by the server user.
fn server_temp_dir(user: Option<&ServerUser>) -> TempDir {
    let Some(user) = user else {
        return tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .expect("postgres tempdir");
    };
    let owner = format!("{}:{}", user.uid, user.gid);
    for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        let Ok(dir) = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir_in(&base)
        else {
            continue;
        };
        let chowned = Command::new("chown")
            .arg(&owner)
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        let usable = chowned
            && as_user(Some(user), PathBuf::from("test"))
                .arg("-w")
                .arg(dir.path())
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if usable {
            return dir;
        }
    }
    panic!(
        "no temporary folder that user {} ({owner}) can write in, under {} or /tmp",
        user.name,
        std::env::temp_dir().display()
    );
}

/// A command running `program` as `user` (through `setpriv`, which execs: the child's PID is the
/// program's), or as this process's user when `None`.
fn as_user(user: Option<&ServerUser>, program: PathBuf) -> Command {
    match user {
        None => Command::new(program),
        Some(user) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .args(["--clear-groups", "--"])
                .arg(program);
            cmd
        }
    }
}

/// Sends signal `name` (`INT`, `STOP`, `KILL`...) to `pids` with the `kill` command; errors (a process
/// already gone) are ignored.
fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One process as /proc/PID/stat describes it; `pid` and `start` together name it even if PIDs are reused.
#[derive(Clone, Copy, Debug)]
struct Proc {
    /// Its process ID.
    pid: u32,
    /// Its parent's process ID.
    ppid: u32,
    /// When it started (clock ticks since boot).
    start: u64,
    /// Its state letter (`R`, `S`, `Z` for a zombie...).
    state: char,
}

impl Proc {
    /// Process `pid` now, if it exists.
    fn read(pid: u32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ..."; COMM may hold spaces and parentheses, so split after the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        Some(Proc {
            pid,
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            // Field 22 of stat, the 20th after COMM.
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Whether this very process (same PID and start time) still runs; a zombie counts as gone.
    fn alive(&self) -> bool {
        Proc::read(self.pid)
            .is_some_and(|now| now.start == self.start && !matches!(now.state, 'Z' | 'X'))
    }
}

/// Every live descendant of `root` (children, their children...), from one scan of /proc.
fn descendants(root: u32) -> Vec<Proc> {
    let all: Vec<Proc> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(Proc::read)
        .filter(|p| !matches!(p.state, 'Z' | 'X'))
        .collect();
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            found.push(*p);
            parents.push(p.pid);
        }
    }
    found
}

/// Waits (at most `timeout`) until none of `procs` is alive; the PIDs still alive otherwise.
fn wait_gone(procs: &[Proc], timeout: Duration) -> Result<(), Vec<u32>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = procs.iter().filter(|p| p.alive()).map(|p| p.pid).collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PostgreSQL cluster of its own, running on a free loopback port: `kill9`/`restart` keep its data
/// folder and port; drop stops it (fast shutdown, then SIGKILL) by PID, backends included.
pub struct PostgresServer {
    /// The loopback TCP port it listens on.
    pub port: u16,
    /// The binaries folder (`None`: the PATH).
    bin: Option<PathBuf>,
    /// Who initdb and postgres run as (`None`: this process's user).
    user: Option<&'static ServerUser>,
    /// The postmaster, when running (its PID is the server's: `setpriv` execs).
    child: Option<Child>,
    /// Holds `data/` (the cluster), `sock/` (the Unix socket) and `postgres.log`.
    dir: TempDir,
}

impl PostgresServer {
    /// initdb's a fresh cluster, starts it on a free port (retried if the port was taken meanwhile), waits
    /// until it accepts connections and creates the database [`PG_DATABASE`].
    pub fn start() -> PostgresServer {
        let user = server_user();
        let dir = server_temp_dir(user);
        let mut server = PostgresServer {
            port: 0,
            bin: pg_bin_dir(),
            user,
            child: None,
            dir,
        };
        server.initdb();
        let mut last = String::new();
        for _ in 0..3 {
            server.port = free_loopback_port();
            match server.spawn() {
                Ok(()) => {
                    server.psql_in("postgres", &format!("CREATE DATABASE {PG_DATABASE}"));
                    return server;
                }
                Err(logs) => last = logs,
            }
            server.remove_stale_lock();
        }
        panic!("postgres kept failing to start; its last log:\n{last}");
    }

    /// `postgres://tollgate@127.0.0.1:PORT/tollgate`.
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{PG_DATABASE}", self.port)
    }

    /// The cluster's data folder (kept by `kill9` and `restart`, removed on drop).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The postmaster's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the postmaster is running (as far as this handle knows: `kill9` and drop stop it).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The PIDs of the postmaster and every live process under it (backends, checkpointer...); empty when
    /// it is not running.
    pub fn processes(&self) -> Vec<u32> {
        match self.pid() {
            Some(pid) => std::iter::once(pid)
                .chain(descendants(pid).iter().map(|p| p.pid))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Kills the postmaster and its backends with SIGKILL (a crash, by PID), reaps the postmaster, and waits
    /// until they are gone and the port refuses connections. The data folder stays for `restart`.
    pub fn kill9(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Err(e) = self.kill_all() {
            panic!("{e}");
        }
        let deadline = Instant::now() + PG_GONE;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts connections {PG_GONE:?} after kill -9 of postgres",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data folder and port (after `kill9`; a running server is
    /// `kill9`ed first), so it runs crash recovery; waits until it accepts connections.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.remove_stale_lock();
        let deadline = Instant::now() + PG_STARTUP;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(logs) if Instant::now() >= deadline => {
                    panic!("postgres did not restart on port {}:\n{logs}", self.port)
                }
                // The old listening socket may linger for a moment, or the port was taken meanwhile.
                Err(_) => {
                    self.remove_stale_lock();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Runs `sql` with `psql` in [`PG_DATABASE`] (unaligned, tuples only, stops at the first error) and
    /// returns its output; panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(PG_DATABASE, sql)
    }

    /// [`psql`](Self::psql) in `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let out = self
            .client(&["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"], "psql")
            .args(["-d", database, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql -c {sql:?} on port {} failed ({}): {}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server log so far (initdb's output, then every start's).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where initdb and postgres write (stdout and stderr; no logging collector).
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The folder for the server's Unix socket (inside the temporary folder, not /var/run/postgresql).
    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// `name` in the binaries folder, or bare (looked up on the PATH).
    fn tool(&self, name: &str) -> PathBuf {
        match &self.bin {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// A client tool (`psql`, `pg_isready`) aimed at this server over TCP as [`PG_USER`], with `flags`
    /// first; the caller's PG* settings that could redirect it are removed, connecting is bounded.
    fn client(&self, flags: &[&str], name: &str) -> Command {
        let mut cmd = Command::new(self.tool(name));
        cmd.args(flags)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .env_remove("PGSSLMODE")
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null());
        cmd
    }

    /// The log file, opened for appending (handed to initdb and postgres as stdout and stderr).
    fn open_log(&self) -> (Stdio, Stdio) {
        let file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open postgres.log");
        let copy = file.try_clone().expect("clone postgres.log handle");
        (Stdio::from(file), Stdio::from(copy))
    }

    /// `initdb` of `data/` as the server user (trust auth, superuser [`PG_USER`], UTF8 with the C locale,
    /// no fsync), bounded by [`PG_STARTUP`]; also creates `sock/`.
    fn initdb(&self) {
        let sock = self.socket_dir();
        as_user(self.user, PathBuf::from("mkdir"))
            .arg(&sock)
            .status()
            .ok()
            .filter(|s| s.success())
            .unwrap_or_else(|| panic!("mkdir {} as the server user failed", sock.display()));
        let (stdout, stderr) = self.open_log();
        let mut child = as_user(self.user, self.tool("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "--auth=trust",
                "-U",
                PG_USER,
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg("--no-sync")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (set TOLLGATE_PG_BIN, or run scripts/test, which installs \
                     PostgreSQL): {e}",
                    self.tool("initdb").display()
                )
            });
        let deadline = Instant::now() + PG_STARTUP;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() >= deadline {
                signal("KILL", &[child.id()]);
                let _ = child.wait();
                panic!("initdb took over {PG_STARTUP:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "initdb failed ({status}):\n{}",
            self.log()
        );
    }

    /// Starts postgres on `self.port` and waits (bounded) until it is ready; on failure nothing of it runs
    /// any more and the error holds the log's tail.
    fn spawn(&mut self) -> Result<(), String> {
        let (stdout, stderr) = self.open_log();
        let child = as_user(self.user, self.tool("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir().display()
            ))
            // Survives kill9 (the kernel keeps what was written), not an OS crash: fine for tests.
            // synchronous_commit stays on, so a commit acknowledged before kill9 survives it.
            .args(["-c", "fsync=off"])
            .args(["-c", "logging_collector=off"])
            // In the data folder, not /dev/shm, so a killed server leaves nothing behind there.
            .args(["-c", "dynamic_shared_memory_type=mmap"])
            .args(["-c", "log_line_prefix=%m [%p] "])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.tool("postgres").display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + PG_STARTUP;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                // A failed start (the port taken, say) exits before it forks anything.
                self.child = None;
                return Err(format!(
                    "postgres exited with {status}:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ));
            }
            if self.is_ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = self.log_tail(LOG_TAIL_LINES);
                let killed = match self.kill_all() {
                    Ok(()) => "killed".to_owned(),
                    Err(e) => e,
                };
                return Err(format!(
                    "not ready within {PG_STARTUP:?} ({killed}):\n{logs}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether our postmaster says it is ready (postmaster.pid: our PID on line 1, `ready` on line 8) and
    /// `pg_isready` confirms it accepts connections on the port.
    fn is_ready(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let pid_file =
            std::fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap_or_default();
        let lines: Vec<&str> = pid_file.lines().map(str::trim).collect();
        let ours = pid.to_string();
        if lines.first() != Some(&ours.as_str()) || lines.get(7) != Some(&"ready") {
            return false;
        }
        self.client(&["-q", "-t", "2", "-d", "postgres"], "pg_isready")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGKILLs the postmaster and everything under it, by PID: the postmaster is first stopped (SIGSTOP)
    /// so it cannot fork a backend between the listing and the kill. Reaps it and waits (bounded) until all
    /// are gone.
    fn kill_all(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        signal("STOP", &[pid]);
        let under = descendants(pid);
        let mut pids = vec![pid];
        pids.extend(under.iter().map(|p| p.pid));
        signal("KILL", &pids);
        let _ = child.wait();
        wait_gone(&under, PG_GONE).map_err(|left| {
            format!("postgres processes {left:?} (under postmaster {pid}) outlived SIGKILL")
        })
    }

    /// Fast shutdown (SIGINT: clients are disconnected, a checkpoint is written); after [`PG_SHUTDOWN`],
    /// or if a process under the postmaster outlives it, everything is SIGKILLed by PID.
    fn shutdown(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        let under = descendants(pid);
        signal("INT", &[pid]);
        let deadline = Instant::now() + PG_SHUTDOWN;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "postgres {pid} did not shut down within {PG_SHUTDOWN:?}; sending SIGKILL"
                );
                return self.kill_all();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The postmaster waits for its children before exiting; anything left is killed all the same.
        let left: Vec<Proc> = under.into_iter().filter(Proc::alive).collect();
        signal("KILL", &left.iter().map(|p| p.pid).collect::<Vec<_>>());
        wait_gone(&left, PG_GONE)
            .map_err(|left| format!("postgres processes {left:?} outlived SIGKILL"))
    }

    /// After a crash (every process of the old server is gone): removes the old postmaster.pid and socket
    /// lock, whose PID may meanwhile belong to another process, which would make postgres refuse to start.
    /// postgres itself still finds and drops the old shared-memory segment (its key derives from the data
    /// folder).
    fn remove_stale_lock(&self) {
        let sock = format!(".s.PGSQL.{}", self.port);
        let _ = std::fs::remove_file(self.data_dir().join("postmaster.pid"));
        let _ = std::fs::remove_file(self.socket_dir().join(format!("{sock}.lock")));
        let _ = std::fs::remove_file(self.socket_dir().join(sock));
    }

    /// After a crash that no restart follows: removes the old server's System V shared-memory segment
    /// (its ID is on line 7 of postmaster.pid), which would otherwise outlive the test.
    fn remove_stale_shmem(&self) {
        let Ok(pid_file) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let Some(shmid) = pid_file
            .lines()
            .nth(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            return;
        };
        let _ = Command::new("ipcrm")
            .args(["-m", &shmid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- postgres {} log (last {LOG_TAIL_LINES} lines) ---\n{}",
                self.port,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        if let Err(e) = self.shutdown() {
            eprintln!("{e}");
        }
        // A clean shutdown removes postmaster.pid; it is left after kill9 (or the SIGKILL fallback).
        self.remove_stale_shmem();
    }
}
