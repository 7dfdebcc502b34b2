//! The registry binary as a real process: started on a port the kernel picks (it logs the
//! address it bound), its log kept in a file, killed when the value is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use signpost_shared::client::{ClientConfig, RegistryClient};

/// Settings for a registry process.
#[derive(Debug, Default)]
pub struct RegistryBuilder {
    args: Vec<String>,
    database_url: Option<String>,
    cwd: Option<PathBuf>,
}

impl RegistryBuilder {
    /// A registry on `database_url` (none: the default SQLite file).
    pub fn new(database_url: Option<&str>) -> Self {
        RegistryBuilder { database_url: database_url.map(str::to_string), ..Default::default() }
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds `--name value`.
    pub fn flag(self, name: &str, value: impl Into<String>) -> Self {
        self.arg(format!("--{name}")).arg(value)
    }

    /// Runs the process in `dir` (the default data folder is relative to it).
    pub fn cwd(mut self, dir: PathBuf) -> Self {
        self.cwd = Some(dir);
        self
    }

    /// Starts the process and waits until it listens.
    pub async fn start(self) -> Registry {
        let dir = tempfile::Builder::new().prefix("signpost-registry-").tempdir().expect("temp dir");
        let log = dir.path().join("registry.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_signpost-registry"));
        command.args(["--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "info,signpost_registry=debug"]);
        if let Some(url) = &self.database_url {
            command.args(["--database-url", url]);
        }
        if self.cwd.is_none() {
            command.args(["--data-dir", &dir.path().join("data").display().to_string()]);
        }
        command.args(&self.args);
        command.current_dir(self.cwd.clone().unwrap_or_else(|| dir.path().to_path_buf()));
        command.env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null());
        command.stderr(std::fs::File::create(&log).expect("log file"));
        let child = command.spawn().expect("start signpost-registry");
        let mut registry = Registry { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), log, _dir: dir };
        registry.addr = registry.wait_listening().await;
        registry
    }
}

/// A running registry process.
pub struct Registry {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    async fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + super::patience(Duration::from_secs(60));
        loop {
            for line in self.log_text().lines() {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if entry["message"] == "listening"
                    && let Some(addr) = entry["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    return addr;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("signpost-registry exited with {status} before listening; log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                panic!("signpost-registry did not listen in time; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://addr/path`.
    pub fn at(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A typed client with no retries (tests want to see each answer).
    pub fn client(&self) -> RegistryClient {
        let mut config = ClientConfig::new(vec![self.url().parse().expect("url")]);
        config.retries = 0;
        RegistryClient::new(config).expect("client")
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then wait for it to die.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code within `timeout` (None if still running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The value of an unlabelled metric, read from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(self.at("/metrics")).await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- registry log ({}) ---\n{}", self.addr, self.log_text());
        }
    }
}
