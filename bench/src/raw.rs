//! `--driver raw`: a bare HTTP/1.1 client, one keep-alive connection per worker, that writes
//! a prepared `GET` and reads the answer by its `Content-Length`. It costs the generator a
//! few microseconds of CPU per request, against about 17 µs through reqwest, so that a
//! server answering 50,000+ requests/s on the same 2 cores is not measured as slow as the
//! generator. It understands only what the servers under test send: a status line, headers
//! and a body of known length (no chunked bodies).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::load::{Outcome, Session};

/// Longest answer head read.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// One worker's connection and the requests it cycles over.
pub struct Raw {
    host: String,
    port: u16,
    /// `GET` requests, ready to write; request `seq` is `requests[seq % len]`.
    requests: Arc<Vec<Vec<u8>>>,
    timeout: Duration,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Raw {
    /// A factory of sessions to the server at `url` (`http://host:port`), one per worker;
    /// request `seq` asks for `paths[seq % paths.len()]`.
    pub fn sessions(url: &str, paths: &[String], timeout: Duration) -> anyhow::Result<impl FnMut() -> Raw + use<>> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
        if parsed.scheme() != "http" {
            bail!("--driver raw speaks plain http only, not `{}`", parsed.scheme());
        }
        let host = parsed.host_str().context("the URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let prefix = parsed.path().trim_end_matches('/').to_owned();
        let authority = if parsed.port().is_some() { format!("{}:{port}", parsed.host_str().unwrap_or_default()) } else { host.clone() };
        if paths.is_empty() {
            bail!("no path to request");
        }
        let requests: Arc<Vec<Vec<u8>>> = Arc::new(
            paths
                .iter()
                .map(|path| {
                    format!("GET {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: signpost-bench\r\nAccept: */*\r\n\r\n")
                        .into_bytes()
                })
                .collect(),
        );
        Ok(move || Raw {
            host: host.clone(),
            port,
            requests: requests.clone(),
            timeout,
            stream: None,
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    async fn exchange(&mut self, seq: u64) -> Result<Outcome, String> {
        let request = &self.requests[(seq % self.requests.len() as u64) as usize];
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| format!("connect: {e}"))?;
                stream.set_nodelay(true).map_err(|e| format!("set_nodelay: {e}"))?;
                self.stream.insert(stream)
            }
        };
        stream.write_all(request).await.map_err(|e| format!("write: {e}"))?;
        self.buffer.clear();
        let head = loop {
            if let Some(head) = parse_head(&self.buffer)? {
                break head;
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                return Err("answer head too long".into());
            }
            read_more(stream, &mut self.buffer).await?;
        };
        let total = head.length + head.content_length;
        while self.buffer.len() < total {
            read_more(stream, &mut self.buffer).await?;
        }
        if self.buffer.len() > total {
            return Err("more bytes than the answer's Content-Length".into());
        }
        if head.close {
            self.stream = None;
        }
        let body = &self.buffer[head.length..total];
        Ok(if (200..300).contains(&head.status) {
            Outcome::Ok { bytes: body.len() as u64 }
        } else {
            Outcome::Status { status: head.status, body: String::from_utf8_lossy(body).chars().take(300).collect() }
        })
    }
}

impl Session for Raw {
    async fn send(&mut self, seq: u64) -> Outcome {
        let result = match tokio::time::timeout(self.timeout, self.exchange(seq)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}", humantime::format_duration(self.timeout))),
        };
        result.unwrap_or_else(|error| {
            // The connection is in an unknown state: the next request opens a new one.
            self.stream = None;
            Outcome::Failed(error)
        })
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<(), String> {
    buffer.reserve(16 * 1024);
    match stream.read_buf(buffer).await {
        Ok(0) => Err("connection closed by the server".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// What the head of an answer says.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes of the status line and headers, with the blank line.
    length: usize,
    status: u16,
    content_length: usize,
    /// The server closes the connection after this answer.
    close: bool,
}

/// The head of the answer at the start of `buffer`; `None` while it is incomplete.
fn parse_head(buffer: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let length = match response.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("unreadable answer: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let mut content_length = None;
    let mut close = response.version == Some(0);
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.trim().parse::<usize>().map_err(|_| format!("bad Content-Length `{value}`"))?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding `{value}` is not supported by --driver raw"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    let content_length = match content_length {
        Some(n) => n,
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err("answer without Content-Length".into()),
    };
    Ok(Some(Head { length, status, content_length, close }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_read() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_head(answer), Ok(Some(Head { length: answer.len() - 2, status: 200, content_length: 2, close: false })));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le"), Ok(None));
        let closing = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_head(closing).map(|h| h.map(|h| (h.status, h.close))), Ok(Some((503, true))));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn talks_to_a_server() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut buffer = vec![0u8; 4096];
                let n = stream.read(&mut buffer).await?;
                seen.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await?;
            }
            anyhow::Ok(seen)
        });
        let mut sessions = Raw::sessions(&url, &["/a".to_owned(), "/b".to_owned()], Duration::from_secs(5))?;
        let mut session = sessions();
        for seq in 0..2 {
            let outcome = session.send(seq).await;
            assert!(matches!(outcome, Outcome::Ok { bytes: 5 }), "{outcome:?}");
        }
        let seen = server.await??;
        assert!(seen[0].starts_with("GET /a HTTP/1.1\r\nHost: 127.0.0.1:"), "{seen:?}");
        assert!(seen[1].starts_with("GET /b HTTP/1.1\r\n"), "{seen:?}");
        Ok(())
    }
}
