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
