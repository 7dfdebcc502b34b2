//! A tiny HTTP service for agents to check: it answers every request with the status it is
//! told to, or stops listening altogether.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A running test service.
pub struct TestService {
    /// Its port on 127.0.0.1.
    pub port: u16,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl TestService {
    /// Starts answering 200.
    pub async fn start() -> TestService {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let status = Arc::new(AtomicU16::new(200));
        let answer = status.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = stream.read(&mut buf).await;
                    let code = answer.load(Ordering::Relaxed);
                    let reply = format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        TestService { port, status, task }
    }

    /// Its health URL.
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    /// Answers `code` from now on.
    pub fn answer(&self, code: u16) {
        self.status.store(code, Ordering::Relaxed);
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An application stand-in as a process of its own (`signpost-test-service`), answering 200
/// to everything, that a test can kill -9 and start again on the same port.
pub struct ServiceProcess {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    runs: u32,
}

impl ServiceProcess {
    /// Starts it on a port of its own.
    pub async fn start() -> ServiceProcess {
        let dir = tempfile::Builder::new().prefix("signpost-service-").tempdir().expect("temp dir");
        let mut service = ServiceProcess { port: crate::free_port(), child: None, dir, runs: 0 };
        service.spawn().await;
        service
    }

    async fn spawn(&mut self) {
        self.runs += 1;
        let log = self.dir.path().join(format!("service-{}.log", self.runs));
        let mut command = std::process::Command::new(crate::binary("signpost-test-service"));
        command.args(["--listen", &format!("127.0.0.1:{}", self.port)]).stdin(std::process::Stdio::null());
        command.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log).expect("log file"));
        let child = self.child.insert(command.spawn().expect("start signpost-test-service"));
        crate::process::wait_listening(child, &log).await;
    }

    /// Its health URL.
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    /// SIGKILL, then wait for it to die.
    pub fn kill(&mut self) {
        crate::process::kill_child(self.child.as_mut());
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
