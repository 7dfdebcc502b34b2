//! TLS on the registry and the request limits of both HTTP servers, on real processes and
//! sockets: an agent trusting the registry's private CA follows it over HTTPS, one that does
//! not is refused and says why; new certificate files are served to new connections while
//! open ones keep going; slow, oversized and too many clients are cut off or held back while
//! lookups keep being answered; bad TLS settings stop the start with exit 64.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Datelike;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use signpost_e2e::{AgentBuilder, Registry, RegistryBuilder, binary, eventually, patience};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === A throwaway PKI ===

/// A CA of its own in a folder of its own, issuing server certificates for 127.0.0.1.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and key as written to disk.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Signpost test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA certificate");
        let dir = tempfile::Builder::new().prefix("signpost-pki-").tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write the CA");
        Pki { dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for 127.0.0.1 and localhost with `serial`, written to
    /// `registry.crt`/`registry.key` (replaced atomically, key first).
    fn issue(&self, serial: u64) -> Leaf {
        self.issue_until(serial, None)
    }

    /// As `issue`, valid until the end of `days` days from today (negative: expired) instead
    /// of rcgen's far-off default.
    fn issue_until(&self, serial: u64, days: Option<i64>) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(DnType::CommonName, format!("signpost registry {serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        if let Some(days) = days {
            let day = |d: i64| {
                let at = chrono::Utc::now() + chrono::TimeDelta::days(d);
                rcgen::date_time_ymd(at.year(), at.month() as u8, at.day() as u8)
            };
            params.not_before = day(days.min(0) - 30);
            params.not_after = day(days);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign the leaf");
        let (cert_path, key_path) = (self.dir.path().join("registry.crt"), self.dir.path().join("registry.key"));
        replace(&key_path, key.serialize_pem().as_bytes());
        replace(&cert_path, cert.pem().as_bytes());
        Leaf { cert: cert_path, key: key_path, der: cert.der().clone() }
    }
}

/// Writes `path` by renaming a finished temporary file over it, as a deploy tool would.
fn replace(path: &Path, contents: &[u8]) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, contents).expect("write");
    std::fs::rename(&temp, path).expect("rename");
}

/// A TLS client trusting only `ca`.
fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("read the CA");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.expect("a CA certificate")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Opens a new TLS connection to `addr`; returns it with the leaf certificate it was shown.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, CertificateDer<'static>)> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector.connect(ServerName::from(addr.ip()), tcp).await?;
    let leaf = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().expect("a server certificate");
    Ok((stream, leaf))
}

/// Sends one `GET path` on an open connection (keep-alive) and returns the status code.
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let head = read_head(stream).await?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    // Read the body too, so the next request on this connection starts clean.
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(status)
}

/// Reads up to the end of a response's headers; None when the connection closes first.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

/// Waits until the server closes `stream` (EOF or reset), for at most `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close is fine: keep reading to the end.
            Ok(Ok(_)) => {}
        }
    }
}

async fn register(registry: &Registry, id: &str, service: &str) {
    let body = json!({"id": id, "service": service, "address": "10.0.0.1", "port": 8080});
    let response = registry.http().post(registry.at("/v1/instances")).json(&body).send().await.expect("POST");
    assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
}

/// The ids of `service`'s healthy instances at `url` (registry or agent), if it answers.
async fn ids(client: &reqwest::Client, url: &str) -> Option<Vec<String>> {
    let page: Value = client.get(url).send().await.ok()?.json().await.ok()?;
    Some(page["instances"].as_array()?.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect())
}

// === TLS ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trusting_the_ca_follows_the_registry_over_https_and_one_without_it_says_why() {
    let pki = Pki::new();
    let leaf = pki.issue(1);
    let registry = RegistryBuilder::new(None).tls(&leaf.cert, &leaf.key, &pki.ca_file()).start().await;
    assert!(registry.url().starts_with("https://"), "{}", registry.url());
    register(&registry, "api-1", "api").await;

    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::get(format!("http://{}/healthz", registry.addr)).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP must not be served on the TLS port");

    let trusting = AgentBuilder::new("tls-a", &[registry.url()])
        .flag("registry-ca-file", pki.ca_file().display().to_string())
        .flag("service", "web:8080")
        .start()
        .await;
    let untrusting = AgentBuilder::new("tls-b", &[registry.url()]).flag("service", "other:9090").start().await;

    // The trusting agent follows the catalog (it sees what was registered at the registry)
    // and registers its own service.
    let http = reqwest::Client::new();
    eventually("the agent answers api-1 from the registry's catalog", Duration::from_secs(30), || async {
        ids(&http, &trusting.at("/v1/services/api")).await.filter(|ids| ids == &["api-1"]).map(|_| ())
    })
    .await;
    let client = registry.http();
    eventually("the registry has the agent's web instance", Duration::from_secs(30), || async {
        ids(&client, &registry.at("/v1/services/web")).await.filter(|ids| ids == &["tls-a-web-8080"]).map(|_| ())
    })
    .await;

    // The other one cannot reach it, and its log says it is the certificate.
    eventually("the untrusting agent logs why it cannot reach the registry", Duration::from_secs(30), || async {
        let log = untrusting.log_text();
        log.lines()
            .find(|l| l.contains("cannot follow the registry's catalog") && l.contains("certificate") && l.contains("UnknownIssuer"))
            .map(|_| ())
    })
    .await;
    assert_eq!(ids(&client, &registry.at("/v1/services/other")).await, Some(vec![]), "nothing got through without trust");
    assert!(!registry.log_text().contains("BEGIN"), "no key material in the registry's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_warned_about_and_an_expired_one_logged_as_an_error() {
    let pki = Pki::new();
    let soon = pki.issue_until(1, Some(5));
    let registry = RegistryBuilder::new(None).tls(&soon.cert, &soon.key, &pki.ca_file()).start().await;
    let log = registry.log_text();
    let warning = log.lines().find(|l| l.contains("the TLS certificate expires soon")).unwrap_or_else(|| panic!("no warning in:\n{log}"));
    let entry: Value = serde_json::from_str(warning).expect("a JSON log line");
    assert_eq!(entry["level"], "WARN", "{warning}");
    // Five days from midnight UTC: 4 or 5 left, 3 if the date turned while the test ran.
    assert!(matches!(entry["days_left"].as_i64(), Some(3..=5)), "{warning}");

    // Swapped for one that has expired (say, a renewal job wrote a stale file): still served,
    // since it is a good pair, but said loudly.
    pki.issue_until(2, Some(-1));
    eventually("the expired certificate is logged as an error", Duration::from_secs(20), || async {
        registry.log_text().lines().find(|l| l.contains("the TLS certificate has expired") && l.contains("ERROR")).map(|_| ())
    })
    .await;
    // A certificate with years left says nothing of the kind.
    let other_pki = Pki::new();
    let fine = other_pki.issue(3);
    let other = RegistryBuilder::new(None).tls(&fine.cert, &fine.key, &other_pki.ca_file()).start().await;
    let log = other.log_text();
    assert!(log.contains("TLS certificate loaded") && !log.contains("expires soon") && !log.contains("has expired"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificate_files_serve_new_connections_while_open_ones_go_on() {
    let pki = Pki::new();
    let first = pki.issue(1);
    let mut registry = RegistryBuilder::new(None).tls(&first.cert, &first.key, &pki.ca_file()).start().await;
    let connector = tls_connector(&pki.ca_file());
    let (mut open, shown) = tls_connect(&connector, registry.addr).await.expect("connect over TLS");
    assert_eq!(shown, first.der, "the first certificate is served");
    assert_eq!(get_on(&mut open, "/healthz").await, Some(200));

    let second = pki.issue(2);
    assert_ne!(second.der, first.der);
    eventually("a new connection is shown the new certificate", Duration::from_secs(20), || async {
        let (_, shown) = tls_connect(&connector, registry.addr).await.ok()?;
        (shown == second.der).then_some(())
    })
    .await;
    // The connection opened before the reload was kept and still answers.
    assert_eq!(get_on(&mut open, "/healthz").await, Some(200), "the open connection survives the reload");
    eventually("the registry logs the reload", Duration::from_secs(10), || async {
        registry.log_text().contains("TLS certificate reloaded").then_some(())
    })
    .await;

    // A broken pair (a certificate whose key is not the one on disk) is refused: the
    // registry keeps serving the second certificate, and says why.
    let other_key = KeyPair::generate().expect("key");
    replace(&second.key, other_key.serialize_pem().as_bytes());
    eventually("the registry logs the broken pair", Duration::from_secs(20), || async {
        registry.log_text().contains("not a usable pair").then_some(())
    })
    .await;
    let (mut fresh, shown) = tls_connect(&connector, registry.addr).await.expect("connect after a bad reload");
    assert_eq!(shown, second.der, "the last good certificate stays");
    assert_eq!(get_on(&mut fresh, "/healthz").await, Some(200));
    assert!(registry.is_running());
    let log = registry.log_text();
    assert!(!log.contains("PRIVATE KEY"), "no key material in the log");
}

// === Request limits ===

/// A registry (loopback, plain HTTP) or an agent with short limits, and a lookup path.
enum Server {
    Registry(Registry),
    Agent(signpost_e2e::Agent),
}

impl Server {
    async fn start(which: &str, flags: &[(&str, &str)]) -> Server {
        match which {
            "registry" => {
                let mut builder = RegistryBuilder::new(None);
                for (name, value) in flags {
                    builder = builder.flag(name, *value);
                }
                Server::Registry(builder.start().await)
            }
            _ => {
                let mut builder = AgentBuilder::new("limits", &[]);
                for (name, value) in flags {
                    builder = builder.flag(name, *value);
                }
                Server::Agent(builder.start().await)
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Registry(r) => r.addr,
            Server::Agent(a) => a.addr,
        }
    }

    /// The value of one of its metrics, named without the binary's prefix.
    async fn metric(&self, name: &str) -> f64 {
        let value = match self {
            Server::Registry(r) => r.metric(&format!("signpost_registry_{name}")).await,
            Server::Agent(a) => a.metric(&format!("signpost_agent_{name}")).await,
        };
        value.unwrap_or_else(|| panic!("no metric {name} on /metrics"))
    }

    fn lookup_url(&self) -> String {
        format!("http://{}/v1/services", self.addr())
    }

    /// A path that takes a JSON body.
    fn write_path(&self) -> &'static str {
        match self {
            Server::Registry(_) => "/v1/instances",
            Server::Agent(_) => "/v1/agent/services",
        }
    }
}

/// A lookup on a new connection answers 200 within `within`.
async fn lookup_answers(url: &str, within: Duration) -> bool {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(within).build().expect("client");
    client.get(url).send().await.is_ok_and(|r| r.status().is_success())
}

async fn slowloris_is_cut_off_while_lookups_are_answered(which: &str) {
    let timeout = Duration::from_secs(2);
    let server = Server::start(which, &[("header-read-timeout", "2s")]).await;
    let addr = server.addr();
    let started = Instant::now();
    // Ten connections trickling a request's headers a byte at a time, never ending them, and
    // five that send nothing at all.
    let mut tricklers = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        tricklers.push(tokio::spawn(async move {
            let head = b"GET /v1/services HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
            for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                if stream.write_all(&[*byte]).await.is_err() {
                    return Instant::now();
                }
                // The pace of a slowloris, not a wait for a condition.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Instant::now()
        }));
    }
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Meanwhile lookups are answered at once, again and again.
    let lookups = Instant::now();
    let mut answered = 0;
    while lookups.elapsed() < timeout {
        assert!(lookup_answers(&server.lookup_url(), Duration::from_secs(1)).await, "{which}: a lookup went unanswered during the attack");
        answered += 1;
    }
    assert!(answered > 5, "{which}: only {answered} lookups answered");
    // Every slow connection is cut once its headers are late: not before the timeout, and
    // not much after it.
    let slack = patience(Duration::from_secs(3));
    for stream in &mut silent {
        assert!(closed_within(stream, timeout + slack).await, "{which}: a silent connection was not closed");
    }
    for trickler in tricklers {
        let cut_at = tokio::time::timeout(timeout + slack * 2, trickler).await.expect("the trickler was cut off").expect("join");
        let after = cut_at.duration_since(started);
        assert!(after >= timeout, "{which}: cut after {after:?}, before the {timeout:?} timeout");
        assert!(after <= timeout + slack * 2, "{which}: cut only after {after:?}");
    }
    assert!(lookup_answers(&server.lookup_url(), Duration::from_secs(2)).await);
    // What the operator sees: every slow connection counted as a header timeout.
    assert!(server.metric("http_header_timeouts_total").await >= 15.0, "{which}: the 15 cut connections are counted");
    assert!(server.metric("http_connections_accepted_total").await >= 15.0 + answered as f64, "{which}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_registry_is_cut_off_while_lookups_are_answered() {
    slowloris_is_cut_off_while_lookups_are_answered("registry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_agent_is_cut_off_while_lookups_are_answered() {
    slowloris_is_cut_off_while_lookups_are_answered("agent").await;
}

async fn oversized_headers_get_431_and_bodies_413(which: &str) {
    let server = Server::start(which, &[("max-header-bytes", "8192")]).await;
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    let big = "a".repeat(16 * 1024);
    let request = format!("GET /v1/services HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    // The server may answer and close before reading it all: a failed write is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let head = read_head(&mut stream).await.unwrap_or_default();
    assert!(head.is_empty() || head.starts_with("HTTP/1.1 431"), "{which}: {head}");
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await, "{which}: the connection stays open after 431");
    // Headers under the limit are fine.
    let fine = format!("GET /v1/services HTTP/1.1\r\nHost: localhost\r\nX-Small: {}\r\n\r\n", "a".repeat(1024));
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    stream.write_all(fine.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{which}: {head}");

    // Over the 64 KiB limit, under the size past which the server stops reading at once.
    let body = vec![b' '; 100 * 1024];
    let url = format!("http://{}{}", server.addr(), server.write_path());
    let response = reqwest::Client::new().post(url).header("content-type", "application/json").body(body).send().await.expect("POST");
    assert_eq!(response.status(), 413, "{which}");
    let error: Value = response.json().await.expect("the contract's error body");
    assert_eq!(error["error"], "payload_too_large", "{which}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_bodies_413_on_both_servers() {
    oversized_headers_get_431_and_bodies_413("registry").await;
    oversized_headers_get_431_and_bodies_413("agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_fails_its_request_and_frees_the_connection() {
    let server = Server::start("registry", &[("body-read-timeout", "1s")]).await;
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    let head = "POST /v1/instances HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":";
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = tokio::time::timeout(patience(Duration::from_secs(10)), read_head(&mut stream)).await.expect("an answer in time");
    let answer = answer.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await, "the connection is closed after a late body");
}

async fn the_connection_cap_holds_and_frees(which: &str) {
    let cap = 6;
    let server = Server::start(which, &[("max-connections", "6"), ("header-read-timeout", "60s")]).await;
    let addr = server.addr();
    // Fill every slot with connections that say nothing (within the header timeout).
    let mut idle = Vec::new();
    for _ in 0..cap {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // A connection past the cap is not served the route: it is told at once to come back
    // (503, Retry-After) and closed, rather than left waiting behind the slots' holders.
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).await.expect("the kernel still queues it");
        stream.write_all(b"GET /v1/services HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("write");
        let head = tokio::time::timeout(patience(Duration::from_secs(10)), read_head(&mut stream)).await.expect("an answer past the cap");
        let head = head.unwrap_or_default().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 503"), "{which}: past the cap: {head}");
        assert!(head.contains("retry-after: 1"), "{which}: {head}");
        assert!(closed_within(&mut stream, Duration::from_secs(5)).await, "{which}: a connection past the cap stays open");
    }
    assert!(!lookup_answers(&server.lookup_url(), Duration::from_millis(500)).await, "{which}: a lookup got past the cap");
    // Liveness is answered past the cap: a busy server is not a dead one.
    let mut probe = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get_on(&mut probe, "/healthz").await, Some(200), "{which}: /healthz past the cap");

    // Free the slots: lookups are served again.
    drop(idle);
    eventually("lookups are answered again", Duration::from_secs(10), || async {
        lookup_answers(&server.lookup_url(), Duration::from_secs(1)).await.then_some(())
    })
    .await;
    assert!(server.metric("http_connection_cap_reached_total").await >= 1.0, "{which}: reaching the cap is counted");
    assert!(server.metric("http_over_cap_connections_total").await >= 4.0, "{which}: connections past the cap are counted");
    assert_eq!(server.metric("http_header_timeouts_total").await, 0.0, "{which}: nothing timed out here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrys_connection_cap_holds_and_frees() {
    the_connection_cap_holds_and_frees("registry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_connection_cap_holds_and_frees() {
    the_connection_cap_holds_and_frees("agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_is_closed_after_the_idle_timeout_but_not_during_a_long_request() {
    let server = Server::start("registry", &[("idle-timeout", "1s"), ("header-read-timeout", "1s")]).await;
    let Server::Registry(registry) = &server else { unreachable!() };
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    assert_eq!(get_on(&mut stream, "/healthz").await, Some(200));
    assert!(closed_within(&mut stream, patience(Duration::from_secs(5))).await, "an idle connection stays open");
    assert!(server.metric("http_idle_closed_total").await >= 1.0, "the idle close is counted");

    // A blocking catalog query longer than both timeouts is answered, not cut.
    let client = registry.client();
    let index = client.catalog(None, None).await.expect("catalog").index;
    let started = Instant::now();
    let page = client.catalog(Some(index), Some(Duration::from_secs(3))).await.expect("a blocking query outlives the idle timeout");
    assert!(started.elapsed() >= Duration::from_secs(2), "the query did not wait: {:?}", started.elapsed());
    assert_eq!(page.index, index);
}

// === Settings ===

/// Runs `bin` with `args` until it exits (at most 30 s): its exit code and stderr.
fn run_to_exit(bin: &str, args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(binary(bin))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            return (status.code(), stderr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, "still running".into())
}

#[test]
fn bad_tls_settings_and_plain_http_beyond_loopback_stop_the_start() {
    let pki = Pki::new();
    let leaf = pki.issue(1);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data").display().to_string();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM").expect("write");
    let (cert, key, garbage) = (leaf.cert.display().to_string(), leaf.key.display().to_string(), garbage.display().to_string());
    let port = format!("127.0.0.1:{}", signpost_e2e::free_port());
    let wide = format!("0.0.0.0:{}", signpost_e2e::free_port());
    let cases: [(&str, Vec<&str>, &str); 5] = [
        ("signpost-registry", vec!["--listen", &port, "--tls-cert-file", &cert], "set both"),
        ("signpost-registry", vec!["--listen", &port, "--tls-cert-file", &garbage, "--tls-key-file", &key], "no PEM certificate"),
        ("signpost-registry", vec!["--listen", &port, "--tls-cert-file", &cert, "--tls-key-file", &garbage], "no PEM private key"),
        ("signpost-registry", vec!["--listen", &wide], "allow_plain_http"),
        ("signpost-agent", vec!["--registry-ca-file", &garbage, "--gossip-listen", &port], "registry_ca_file"),
    ];
    for (bin, args, expected) in cases {
        let mut args = args;
        args.extend(["--data-dir", &data]);
        let (code, stderr) = run_to_exit(bin, &args, dir.path());
        assert_eq!(code, Some(64), "{bin} {args:?}: {stderr}");
        assert!(stderr.contains("Invalid configuration") && stderr.contains(expected), "{bin} {args:?}: {stderr}");
        assert!(!stderr.contains("PRIVATE KEY"), "no key material in errors");
    }
    // Every new setting is in --help.
    for (bin, flags) in [
        (
            "signpost-registry",
            &[
                "--tls-cert-file",
                "--tls-key-file",
                "--allow-plain-http",
                "--max-connections",
                "--max-header-bytes",
                "--header-read-timeout",
                "--body-read-timeout",
                "--idle-timeout",
            ][..],
        ),
        (
            "signpost-agent",
            &[
                "--registry-ca-file",
                "--max-connections",
                "--max-header-bytes",
                "--header-read-timeout",
                "--body-read-timeout",
                "--idle-timeout",
            ][..],
        ),
    ] {
        let help = Command::new(binary(bin)).arg("--help").output().expect("--help");
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in flags {
            assert!(text.contains(flag), "{bin} --help lacks {flag}");
        }
    }
}
