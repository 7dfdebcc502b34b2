//! `signpost-bench bare`: the "physical limit" of a lookup on this machine. A minimal hyper
//! HTTP/1.1 server on a tokio runtime (as many worker threads as the agent's) that answers
//! every request with the same status, headers and body, taken once from a file or from a
//! running server (e.g. the agent's own answer to `GET /v1/services/{name}`), so that it
//! sends the same bytes as the server it stands beside. No routing, no parsing of the path,
//! no serialisation: what is left is the HTTP/1.1 and TCP work every server pays.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Arguments of `signpost-bench bare`.
#[derive(Debug, Clone, clap::Args)]
pub struct BareArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7399")]
    pub listen: std::net::SocketAddr,
    /// Take the answer from this URL, fetched once at start: its body, its Content-Type and
    /// its `x-signpost-*` headers.
    #[arg(long, conflicts_with = "body_file", required_unless_present = "body_file")]
    pub from_url: Option<String>,
    /// Answer with the content of this file.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// Content-Type of --body-file's answer.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// Another header of the answer, as `NAME: VALUE`; repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Also write the body to this file (e.g. to keep the agent's answer with the results).
    #[arg(long)]
    pub save_body: Option<PathBuf>,
}

/// The one answer.
#[derive(Debug, Clone)]
struct Answer {
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Answer {
    fn response(&self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(self.body.clone()));
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        response
    }
}

/// Runs the bare server until the process is stopped.
pub async fn run(args: BareArgs) -> anyhow::Result<()> {
    let mut answer = match (&args.from_url, &args.body_file) {
        (Some(url), _) => fetch(url).await?,
        (None, Some(path)) => Answer {
            body: Bytes::from(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?),
            headers: vec![(CONTENT_TYPE, HeaderValue::from_str(&args.content_type).context("bad --content-type")?)],
        },
        (None, None) => bail!("give --from-url or --body-file"),
    };
    for header in &args.headers {
        let (name, value) = header.split_once(':').with_context(|| format!("--header `{header}` is not NAME: VALUE"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).with_context(|| format!("bad header name in `{header}`"))?;
        let value = HeaderValue::from_str(value.trim()).with_context(|| format!("bad header value in `{header}`"))?;
        answer.headers.retain(|(n, _)| *n != name);
        answer.headers.push((name, value));
    }
    if let Some(path) = &args.save_body {
        std::fs::write(path, &answer.body).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("bare: listening on {}, answering {} bytes of body to every request", listener.local_addr()?, answer.body.len());
    serve(listener, Arc::new(answer)).await
}

/// Fetches the answer to copy.
async fn fetch(url: &str) -> anyhow::Result<Answer> {
    let client = crate::load::client(1, std::time::Duration::from_secs(10))?;
    let response = client.get(url).send().await.map_err(|e| anyhow::anyhow!("{url}: {}", crate::load::error_chain(&e)))?;
    let status = response.status();
    let headers: Vec<(HeaderName, HeaderValue)> = response
        .headers()
        .iter()
        .filter(|(name, _)| **name == CONTENT_TYPE || name.as_str().starts_with("x-signpost-"))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let body = response.bytes().await.map_err(|e| anyhow::anyhow!("{url}: {}", crate::load::error_chain(&e)))?;
    if !status.is_success() {
        bail!("{url} answered HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(Answer { body, headers })
}

async fn serve(listener: tokio::net::TcpListener, answer: Arc<Answer>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: keep serving the open connections.
            Err(e) => {
                eprintln!("bare: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let response = answer.response();
                async move { Ok::<_, Infallible>(response) }
            });
            // A client that goes away is no error of the server's.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_every_request_alike() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let answer = Answer {
            body: Bytes::from_static(br#"{"service":"web","index":3,"instances":[]}"#),
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (HeaderName::from_static("x-signpost-index"), HeaderValue::from_static("3")),
            ],
        };
        let server = tokio::spawn(serve(listener, Arc::new(answer)));
        let copied = fetch(&format!("{url}/v1/services/web")).await?;
        assert_eq!(copied.body.as_ref(), br#"{"service":"web","index":3,"instances":[]}"#);
        let names: Vec<&str> = copied.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-signpost-index"]);
        assert!(fetch(&format!("{url}/anything/else")).await.is_ok());
        server.abort();
        Ok(())
    }
}
