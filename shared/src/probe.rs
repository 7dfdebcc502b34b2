//! Health probes, the same for the registry (agentless instances) and the agent (local
//! services): HTTP 2xx is passing, 429 warning, anything else or no answer in time critical;
//! TCP is passing when a connection opens in time. Outputs are capped at 4 KB.

use std::time::Duration;

use crate::model::Health;
use crate::validate::MAX_OUTPUT_LEN;

/// An HTTP client fit for probes: no connection reuse (each probe opens its own, as a new
/// client would), no redirects followed.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder().pool_max_idle_per_host(0).redirect(reqwest::redirect::Policy::none()).build()
}

/// GETs `url` within `timeout`.
pub async fn http(client: &reqwest::Client, url: &str, timeout: Duration) -> (Health, String) {
    let (health, output) = match client.get(url).timeout(timeout).send().await {
        Ok(response) => {
            let status = response.status();
            let health = if status.is_success() {
                Health::Passing
            } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                Health::Warning
            } else {
                Health::Critical
            };
            (health, format!("HTTP GET {url}: {status}"))
        }
        Err(e) if e.is_timeout() => (Health::Critical, format!("HTTP GET {url}: timed out after {}", crate::duration::format(timeout))),
        Err(e) => (Health::Critical, format!("HTTP GET {url}: {}", error_chain(&e))),
    };
    (health, truncate(output))
}

/// Opens a TCP connection to `addr` within `timeout`.
pub async fn tcp(addr: &str, timeout: Duration) -> (Health, String) {
    let (health, output) = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (Health::Passing, format!("TCP connect {addr}: success")),
        Ok(Err(e)) => (Health::Critical, format!("TCP connect {addr}: {e}")),
        Err(_) => (Health::Critical, format!("TCP connect {addr}: timed out after {}", crate::duration::format(timeout))),
    };
    (health, truncate(output))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_OUTPUT_LEN {
        let mut end = MAX_OUTPUT_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
