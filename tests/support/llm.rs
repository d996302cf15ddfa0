//! The quickstart's upstream (`examples/quickstart/upstream.py`) as a fake LLM: paths under `/llm/` answer
//! in OpenAI, Anthropic or Gemini shapes, JSON or server-sent events, with the token counts the query asks
//! for (see the script's docstring). One implementation serves the quickstart and the tests.

use std::fs::File;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, root};

/// How long the script may take to listen.
const STARTUP: Duration = Duration::from_secs(15);

/// A running fake LLM; killed and reaped by PID on drop.
pub struct FakeLlm {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
}

impl FakeLlm {
    /// Starts the script with the system's `python3` (standard library only) and waits until it listens.
    pub fn start() -> FakeLlm {
        let dir = tempfile::tempdir().expect("tempdir for the fake LLM");
        let port = free_port();
        let stderr = File::create(dir.path().join("stderr")).expect("fake LLM stderr file");
        let child = Command::new("python3")
            .arg(root().join("examples/quickstart/upstream.py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn python3 examples/quickstart/upstream.py");
        let mut llm = FakeLlm { child, port, dir };
        let deadline = Instant::now() + STARTUP;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = llm.child.try_wait() {
                panic!(
                    "the fake LLM exited ({status}); its stderr:\n{}",
                    llm.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the fake LLM did not listen within {STARTUP:?}; its stderr:\n{}",
                llm.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        llm
    }

    /// What the script wrote to stderr (one line per request).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
