//! A stand-in for an application process that the fault tests can kill: it answers `200 ok`
//! to every HTTP request on `--listen ADDR` (default `127.0.0.1:0`) and logs, as JSON on
//! stderr, `{"message":"listening","addr":…}` once it listens, like the real binaries.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse::<SocketAddr>())) {
            ("--listen", Some(Ok(addr))) => listen = addr,
            _ => {
                eprintln!("usage: signpost-test-service [--listen ADDR]");
                return ExitCode::from(64);
            }
        }
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    eprintln!("{}", serde_json::json!({"message": "listening", "addr": addr}));
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
        });
    }
    ExitCode::SUCCESS
}
