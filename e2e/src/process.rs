//! The registry and agent binaries as real processes: started on HTTP ports the kernel picks
//! (each logs the address it bound), their logs kept in files, killed when dropped.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
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
    listen: Option<u16>,
    ip: Option<std::net::IpAddr>,
    ca_file: Option<PathBuf>,
    wrapper: Vec<String>,
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

    /// Listens on this port instead of one the kernel picks (to restart at the same address).
    pub fn port(mut self, port: u16) -> Self {
        self.listen = Some(port);
        self
    }

    /// Listens on this IP address instead of 127.0.0.1.
    pub fn ip(mut self, ip: std::net::IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Serves HTTPS with the PEM pair `cert` and `key`; `ca` (PEM) is what its clients
    /// ([`Registry::client`], [`Registry::http`]) trust.
    pub fn tls(mut self, cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Self {
        self.ca_file = Some(ca.to_path_buf());
        self.flag("tls-cert-file", cert.display().to_string()).flag("tls-key-file", key.display().to_string())
    }

    /// Runs the binary through `program args… <binary> <its args>` (e.g. `faketime -f +10m`,
    /// for a replica whose clock is off).
    pub fn wrapped(mut self, program: &[&str]) -> Self {
        self.wrapper = program.iter().map(|p| p.to_string()).collect();
        self
    }

    /// Runs the process in `dir` (the default data folder is relative to it).
    pub fn cwd(mut self, dir: PathBuf) -> Self {
        self.cwd = Some(dir);
        self
    }

    /// Starts the process and waits until it listens.
    pub async fn start(self) -> Registry {
        let dir = tempfile::Builder::new().prefix("signpost-registry-").tempdir().expect("temp dir");
        let ip = self.ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let listen = SocketAddr::new(ip, self.listen.unwrap_or(0)).to_string();
        let mut argv: Vec<String> =
            ["--listen", &listen, "--log-format", "json", "--log-level", "info,signpost_registry=debug"].map(String::from).into();
        if let Some(url) = &self.database_url {
            argv.extend(["--database-url".to_string(), url.clone()]);
        }
        if self.cwd.is_none() {
            argv.extend(["--data-dir".to_string(), dir.path().join("data").display().to_string()]);
        }
        argv.extend(self.args);
        let cwd = self.cwd.unwrap_or_else(|| dir.path().to_path_buf());
        let ca_file = self.ca_file;
        let wrapper = self.wrapper;
        let mut registry = Registry { child: None, addr: SocketAddr::from(([127, 0, 0, 1], 0)), argv, cwd, runs: 0, dir, ca_file, wrapper };
        registry.spawn().await;
        registry
    }
}

/// A running registry process (restartable with the same settings; give it a fixed `port`
/// to come back at the same address).
pub struct Registry {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    argv: Vec<String>,
    cwd: PathBuf,
    runs: u32,
    dir: tempfile::TempDir,
    /// The CA its certificate is issued by, when it serves HTTPS.
    ca_file: Option<PathBuf>,
    /// A program the binary runs under, with its arguments.
    wrapper: Vec<String>,
}

impl Registry {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("registry-{}.log", self.runs))
    }

    async fn spawn(&mut self) {
        self.runs += 1;
        let log = self.log_path();
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(crate::binary("signpost-registry"));
                command
            }
            None => Command::new(crate::binary("signpost-registry")),
        };
        command.args(&self.argv).current_dir(&self.cwd).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null());
        command.process_group(0);
        command.stderr(std::fs::File::create(&log).expect("log file"));
        // Held before waiting, so that a process that never listens is still killed on drop.
        let child = self.child.insert(command.spawn().expect("start signpost-registry"));
        self.addr = wait_listening(child, &log).await;
    }

    /// Starts it again (after it was killed or stopped) with the same settings.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `http://addr`, or `https://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `http(s)://addr/path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url())
    }

    /// A typed client with no retries (tests want to see each answer).
    pub fn client(&self) -> RegistryClient {
        let mut config = ClientConfig::new(vec![self.url().parse().expect("url")]);
        config.retries = 0;
        config.ca_file = self.ca_file.clone();
        RegistryClient::new(config).expect("client")
    }

    /// A plain reqwest client that trusts the registry's CA (when it serves TLS).
    pub fn http(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).expect("read the CA file");
            builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("a PEM CA"));
        }
        builder.build().expect("client")
    }

    /// Everything it logged in its current run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Whether the process still runs (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, then wait for it to die.
    pub fn kill(&mut self) {
        kill_child(self.child.as_mut());
    }

    /// SIGTERM, then the exit code within `timeout` (None if still running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        terminate_child(self.child.as_mut()?, timeout).await
    }

    /// The value of a metric, read from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(&reqwest::Client::new(), &self.at("/metrics"), name).await
    }
}

/// The API token of agents that listen beyond loopback (in a network namespace): one per
/// test process.
/// The gossip key of agents in network namespaces (beyond loopback, where keyless gossip is
/// refused): one random key per test process, so that such agents gossip sealed, as in
/// production.
pub fn netns_gossip_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let out = Command::new(crate::binary("signpost-agent")).arg("keygen").output().expect("run signpost-agent keygen");
        assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

pub fn netns_api_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| format!("e2e-api-token-{:016x}", rand::random::<u64>()))
}

/// An HTTP client that presents `api_token` (if any) as a bearer token.
pub fn http_client(api_token: Option<&str>, timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = api_token
        && let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().timeout(timeout).default_headers(headers).build().expect("an HTTP client")
}

/// The value of metric `name` (with its labels, as `/metrics` writes them, e.g.
/// `x_total{reason="stale"}`) at `url`, asked with `client`.
async fn metric_at(client: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the process logged `listening` (JSON logs) and returns the `addr` it names.
pub(crate) async fn wait_listening(child: &mut Child, log: &std::path::Path) -> SocketAddr {
    let deadline = Instant::now() + crate::patience(Duration::from_secs(60));
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if entry["message"] == "listening"
                && let Some(addr) = entry["addr"].as_str().and_then(|a| a.parse().ok())
            {
                return addr;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited with {status} before listening; log:\n{text}", log.display());
        }
        if Instant::now() > deadline {
            panic!("{} did not listen in time; log:\n{text}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGKILL to the child's process group (a wrapper such as `faketime` forks the binary and
/// does not pass signals on), then wait for the child to die.
pub(crate) fn kill_child(child: Option<&mut Child>) {
    if let Some(child) = child {
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// SIGTERM to the child's process group, then the exit code within `timeout` (None if still
/// running).
async fn terminate_child(child: &mut Child, timeout: Duration) -> Option<i32> {
    signal_group(child.id(), "TERM");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}

/// Sends a signal by name to the process group led by `leader` (spawned with
/// `process_group(0)`): the binary and any wrapper around it.
fn signal_group(leader: u32, name: &str) {
    // The group may be gone already (the process was killed before): nothing to say then.
    let _ = Command::new("kill").args([&format!("-{name}"), "--", &format!("-{leader}")]).stderr(Stdio::null()).status();
}

/// Settings for an agent process.
#[derive(Debug)]
pub struct AgentBuilder {
    node: String,
    args: Vec<String>,
    host: Option<NetnsHost>,
    data_dir: Option<PathBuf>,
}

/// Where an agent runs when it runs in a network namespace of its own.
#[derive(Debug, Clone)]
pub struct NetnsHost {
    /// The namespace.
    pub netns: String,
    /// The address its HTTP API listens on (reachable from the test).
    pub api_ip: std::net::IpAddr,
    /// The address it gossips and advertises its services on.
    pub data_ip: std::net::IpAddr,
}

impl AgentBuilder {
    /// An agent named `node` that follows `registry` URLs (none: a registry that is not there).
    pub fn new(node: &str, registries: &[String]) -> Self {
        let mut args = Vec::new();
        for url in registries {
            args.push("--registry".to_string());
            args.push(url.clone());
        }
        AgentBuilder { node: node.to_string(), args, host: None, data_dir: None }
    }

    /// Adds `--name value`.
    pub fn flag(mut self, name: &str, value: impl Into<String>) -> Self {
        self.args.push(format!("--{name}"));
        self.args.push(value.into());
        self
    }

    /// Keeps its data in `dir` (e.g. a small file system the test fills) instead of a folder
    /// of its own.
    pub fn data_dir(mut self, dir: &std::path::Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Runs it in network namespace `host.netns` (as `ip netns exec`), on its addresses.
    pub fn netns(mut self, host: NetnsHost) -> Self {
        self.host = Some(host);
        self
    }

    /// Starts the process and waits until it listens.
    pub async fn start(self) -> Agent {
        let dir = tempfile::Builder::new().prefix("signpost-agent-").tempdir().expect("temp dir");
        let (api_ip, gossip) = match &self.host {
            // A namespace of its own has every port free.
            Some(host) => (host.api_ip, SocketAddr::new(host.data_ip, 7302)),
            None => {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
                (std::net::IpAddr::from([127, 0, 0, 1]), udp.local_addr().expect("addr"))
            }
        };
        let gossip_port = gossip.port();
        let data_dir = self.data_dir.unwrap_or_else(|| dir.path().join("data"));
        let mut args = vec![
            "--node".to_string(),
            self.node.clone(),
            "--listen".into(),
            SocketAddr::new(api_ip, 0).to_string(),
            "--gossip-listen".into(),
            gossip.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            "info,signpost_agent=debug,chitchat=warn".into(),
        ];
        let mut api_token = None;
        if let Some(host) = &self.host {
            args.extend(["--address".to_string(), host.data_ip.to_string()]);
            // Reached from the test's namespace, so beyond loopback: allowed, with a token.
            args.extend(["--allow-remote-api".to_string(), "--api-token".into(), netns_api_token().into()]);
            api_token = Some(netns_api_token().to_string());
            // Gossip beyond loopback is sealed (keyless there needs --insecure-gossip), unless
            // the test chose its keys or chose the clear.
            let chosen = self.args.iter().any(|a| a.starts_with("--gossip-key") || a == "--insecure-gossip");
            if !chosen {
                args.extend(["--gossip-key".to_string(), netns_gossip_key().into()]);
            }
        }
        args.extend(self.args);
        let netns = self.host.map(|h| h.netns);
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let http = http_client(api_token.as_deref(), Duration::from_secs(30));
        let mut agent = Agent { node: self.node, args, netns, dir, data_dir, child: None, addr, gossip_port, runs: 0, http };
        agent.spawn().await;
        agent
    }
}

/// A running agent process (restartable with the same data folder and gossip port).
pub struct Agent {
    /// Its node name.
    pub node: String,
    args: Vec<String>,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Where its HTTP API listens (changes on restart).
    pub addr: SocketAddr,
    /// Its gossip UDP port.
    pub gossip_port: u16,
    netns: Option<String>,
    runs: u32,
    http: reqwest::Client,
}

impl Agent {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("agent-{}.log", self.runs))
    }

    async fn spawn(&mut self) {
        self.runs += 1;
        let log = self.log_path();
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(crate::binary("signpost-agent"));
                command
            }
            None => Command::new(crate::binary("signpost-agent")),
        };
        command.args(&self.args).current_dir(self.dir.path()).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null());
        command.process_group(0);
        command.stderr(std::fs::File::create(&log).expect("log file"));
        // Held before waiting, so that a process that never listens is still killed on drop.
        let child = self.child.insert(command.spawn().expect("start signpost-agent"));
        self.addr = wait_listening(child, &log).await;
    }

    /// Starts it again after it stopped or was killed.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `http://addr/path`.
    pub fn at(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Whether the process still runs (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, then wait for it to die.
    pub fn kill(&mut self) {
        kill_child(self.child.as_mut());
    }

    /// SIGTERM, then the exit code within `timeout` (None if still running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        terminate_child(self.child.as_mut()?, timeout).await
    }

    /// Everything it logged in its current run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The value of a metric, read from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(&self.http, &self.at("/metrics"), name).await
    }

    /// `GET path` of its API (presenting its API token, if it has one).
    pub async fn get(&self, path: &str) -> Option<reqwest::Response> {
        self.http.get(self.at(path)).send().await.ok()
    }

    /// The instance ids of `service` this agent answers, with their health (health=any).
    pub async fn lookup(&self, service: &str) -> Option<Vec<(String, String)>> {
        let body: serde_json::Value = self.get(&format!("/v1/services/{service}?health=any")).await?.json().await.ok()?;
        Some(
            body["instances"]
                .as_array()?
                .iter()
                .filter_map(|i| Some((i["id"].as_str()?.to_string(), i["health"].as_str()?.to_string())))
                .collect(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill_child(self.child.as_mut());
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}", self.node, self.log_text());
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        kill_child(self.child.as_mut());
        if std::thread::panicking() {
            eprintln!("--- registry log ({}) ---\n{}", self.addr, self.log_text());
        }
    }
}
