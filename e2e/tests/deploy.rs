//! The deploy/ files, checked as far as this machine can without Docker or Kubernetes: every
//! YAML document parses and holds the fields a deployment relies on, the compose file's
//! references resolve, the image builds what the README builds, and the shipped command lines,
//! environment and configuration files are accepted by the real binaries, which are started
//! with them and stopped with SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use signpost_agent::config::AgentConfig;
use signpost_e2e::{binary, free_port, signal};

// === files ===

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
}

/// The Kubernetes documents under deploy/kubernetes, with the file each comes from.
fn kubernetes() -> Vec<(String, Value)> {
    let mut files = vec![];
    yaml_files(&repo().join("deploy/kubernetes"), &mut files);
    files.sort();
    files.iter().flat_map(|f| yaml_documents(f).into_iter().map(move |d| (f.display().to_string(), d))).collect()
}

fn object<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} under deploy/kubernetes"))
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what} should be a string, is {value}"))
}

fn array<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value.as_array().unwrap_or_else(|| panic!("{what} should be a list, is {value}"))
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    array(value, what).iter().map(|v| text(v, what).to_string()).collect()
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    array(&deployment["spec"]["template"]["spec"]["containers"], "containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", deployment["metadata"]["name"]))
}

/// Whether every pair of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector map");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The seconds of a `sleep N` preStop hook.
fn pre_stop_seconds(container: &Value) -> u64 {
    let command = strings(&container["lifecycle"]["preStop"]["exec"]["command"], "preStop command");
    assert_eq!(command.first().map(String::as_str), Some("sleep"), "preStop of {} should sleep", container["name"]);
    command[1].parse().expect("preStop sleeps whole seconds")
}

// === command lines ===

/// The `--flags` and subcommands a binary's `--help` documents.
struct Help {
    flags: BTreeSet<String>,
    commands: BTreeSet<String>,
}

fn help(name: &str) -> Help {
    help_of(name, &["--help"])
}

fn subcommand_help(name: &str, subcommand: &str) -> Help {
    help_of(name, &[subcommand, "--help"])
}

fn help_of(name: &str, args: &[&str]) -> Help {
    let output = Command::new(binary(name)).args(args).output().expect("run --help");
    assert!(output.status.success(), "{name} --help failed");
    let text = String::from_utf8(output.stdout).expect("UTF-8 help");
    let flags = text
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').split('=').next().unwrap_or_default().to_string())
        .collect();
    let commands = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    Help { flags, commands }
}

/// The flag names of a command line (`--name value` or `--name=value`).
fn flag_names(args: &[String]) -> Vec<String> {
    args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or_default().to_string()).collect()
}

/// Every value given to `--name` in a command line.
fn flag_values(args: &[String], name: &str) -> Vec<String> {
    let mut values = vec![];
    for (i, arg) in args.iter().enumerate() {
        if let Some(value) = arg.strip_prefix(&format!("{name}=")) {
            values.push(value.to_string());
        } else if arg == name
            && let Some(next) = args.get(i + 1).filter(|n| !n.starts_with("--"))
        {
            values.push(next.clone());
        }
    }
    values
}

fn assert_flags_known(args: &[String], help: &Help, what: &str) {
    for flag in flag_names(args) {
        assert!(help.flags.contains(&flag), "{what}: `{flag}` is not a flag of the binary (its --help lists {:?})", help.flags);
    }
}

/// A `SIGNPOST_<KEY>` variable names a setting when `--<key>` is a flag (the settings and the
/// flags are the same list; `seeds` is `--seed`). An unknown variable would be ignored silently.
fn assert_env_known(name: &str, help: &Help, what: &str) {
    let Some(key) = name.strip_prefix("SIGNPOST_") else { return };
    let flag = format!("--{}", key.to_lowercase().replace('_', "-"));
    let known = help.flags.contains(&flag) || (flag == "--seeds" && help.flags.contains("--seed"));
    assert!(known && flag != "--config", "{what}: {name} is not a setting of the binary, it would be ignored");
}

/// A duration as the binaries write it: `500ms`, `5s`, `1m`.
fn duration(text: &str) -> Duration {
    signpost_shared::duration::parse(text).unwrap_or_else(|e| panic!("`{text}` is not a duration: {e}"))
}

/// The settings an agent started with `args` (its configuration file and flags) runs with.
fn load_agent_args(args: &[String]) -> AgentConfig {
    use clap::Parser as _;
    let cli = signpost_agent::config::Cli::try_parse_from(std::iter::once("signpost-agent".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{args:?} are not the agent's flags: {e}"));
    signpost_agent::config::load(&cli.flags).unwrap_or_else(|e| panic!("{args:?} is not a valid agent configuration: {e}"))
}

// === processes ===

/// A running binary, killed when dropped; its output goes to a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(name: &str, args: &[String], env: &[(String, String)], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(binary(name));
        command.args(args).current_dir(dir).stdin(Stdio::null()).stdout(out.try_clone().expect("log file")).stderr(out);
        // Only what the deploy file says: none of the test's own SIGNPOST_* variables.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SIGNPOST_")) {
            command.env_remove(key);
        }
        command.envs(env.iter().cloned());
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns it and how long it took.
    async fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        signal(self.child.id(), "TERM");
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no exit 30 s after SIGTERM:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `url` answers `status` (its JSON body, or null), while this process runs;
    /// panics with this process's log otherwise.
    async fn answers(&mut self, url: &str, status: u16) -> Value {
        self.answers_as(url, status, None).await
    }

    /// As `answers`, presenting a bearer token (the registry's reads need one once tokens are set).
    async fn answers_as(&mut self, url: &str, status: u16, token: Option<&str>) -> Value {
        let client = signpost_e2e::process::http_client(token, Duration::from_secs(2));
        let deadline = Instant::now() + signpost_e2e::patience(Duration::from_secs(30));
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("the process stopped ({exit}) before {url} answered {status}:\n{}", self.log_text());
            }
            if let Ok(response) = client.get(url).send().await
                && response.status().as_u16() == status
            {
                return response.json::<Value>().await.unwrap_or(Value::Null);
            }
            assert!(Instant::now() < deadline, "{url} did not answer {status} in time; the log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A key from `signpost-agent keygen`.
fn keygen() -> String {
    let out = Command::new(binary("signpost-agent")).arg("keygen").output().expect("run keygen");
    assert!(out.status.success(), "keygen failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    socket.local_addr().expect("local addr").port()
}

async fn status_of(url: &str, token: &str) -> u16 {
    reqwest::Client::new().get(url).bearer_auth(token).send().await.expect("GET").status().as_u16()
}

async fn write_status(url: &str, body: Value, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("POST").status().as_u16()
}

// === a Pod's container, played here ===

/// A container of a Kubernetes Deployment, run as a local process: its volumes written into a
/// folder, its environment resolved (downward API, Secret keys, `$(VAR)` expansion), paths in
/// its arguments mapped into that folder.
struct PodContainer {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Mount path in the container → the local path that stands for it.
    mounts: Vec<(String, PathBuf)>,
}

impl PodContainer {
    fn new(docs: &[(String, Value)], deployment: &Value, name: &str, pod: (&str, &str), dir: &Path) -> PodContainer {
        let spec = &deployment["spec"]["template"]["spec"];
        let container = container(deployment, name);
        let volumes: BTreeMap<&str, &Value> =
            array(&spec["volumes"], "volumes").iter().map(|v| (text(&v["name"], "volume name"), v)).collect();
        let mut mounts = vec![];
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = volumes[text(&mount["name"], "mount name")];
            let local = dir.join(text(&volume["name"], "volume name"));
            std::fs::create_dir_all(&local).expect("volume folder");
            let (source, data_key) = if volume["configMap"].is_object() {
                (object(docs, "ConfigMap", text(&volume["configMap"]["name"], "configMap name")), "data")
            } else if volume["secret"].is_object() {
                (object(docs, "Secret", text(&volume["secret"]["secretName"], "secretName")), "stringData")
            } else {
                assert!(volume["emptyDir"].is_object(), "volume {} should be a configMap, a secret or an emptyDir", volume["name"]);
                mounts.push((text(&mount["mountPath"], "mountPath").to_string(), local));
                continue;
            };
            let items = volume["configMap"]["items"].as_array().or(volume["secret"]["items"].as_array()).expect("volume items");
            for item in items {
                let key = text(&item["key"], "item key");
                let content = text(&source[data_key][key], &format!("key {key} of {}", source["metadata"]["name"]));
                std::fs::write(local.join(text(&item["path"], "item path")), content).expect("write a volume file");
            }
            let local = match mount["subPath"].as_str() {
                Some(sub) => local.join(sub),
                None => local,
            };
            mounts.push((text(&mount["mountPath"], "mountPath").to_string(), local));
        }

        let mut env: Vec<(String, String)> = vec![];
        for var in container["env"].as_array().into_iter().flatten() {
            let name = text(&var["name"], "env name").to_string();
            let value = if let Some(value) = var["value"].as_str() {
                // Kubernetes expands $(VAR) only for variables defined earlier in the list.
                let expanded = env.iter().fold(value.to_string(), |v, (k, x)| v.replace(&format!("$({k})"), x));
                assert!(!expanded.contains("$("), "env {name} = {value} uses a variable not defined before it");
                expanded
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod.0.to_string(),
                    "status.podIP" => pod.1.to_string(),
                    other => panic!("env {name}: fieldRef {other} is not played by this test"),
                }
            } else {
                let secret_ref = &var["valueFrom"]["secretKeyRef"];
                let secret = object(docs, "Secret", text(&secret_ref["name"], "secretKeyRef name"));
                text(&secret["stringData"][text(&secret_ref["key"], "secretKeyRef key")], "secret value").to_string()
            };
            env.push((name, value));
        }

        let mut container = PodContainer { args: vec![], env, mounts };
        let args: Vec<String> = container_args(deployment, name);
        container.args = args.iter().map(|a| container.map_arg(&container.expand(a))).collect();
        container
    }

    /// The local path standing for a path in the container.
    fn local(&self, path: &str) -> Option<PathBuf> {
        self.mounts.iter().find_map(|(mount, local)| {
            let rest = path.strip_prefix(mount.as_str())?;
            Some(if rest.is_empty() { local.clone() } else { local.join(rest.trim_start_matches('/')) })
        })
    }

    fn map_arg(&self, arg: &str) -> String {
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => match self.local(value) {
                Some(local) => format!("{flag}={}", local.display()),
                None => arg.to_string(),
            },
            _ => self.local(arg).map_or_else(|| arg.to_string(), |l| l.display().to_string()),
        }
    }

    /// Replaces the value of `--name=…` (which must be there).
    fn set_flag(&mut self, name: &str, value: &str) {
        let arg = self.args.iter_mut().find(|a| a.starts_with(&format!("{name}="))).unwrap_or_else(|| panic!("no {name}= argument"));
        *arg = format!("{name}={value}");
    }

    /// `$(VAR)` replaced by the container's variable, as Kubernetes does in `command` and `args`.
    fn expand(&self, arg: &str) -> String {
        let expanded = self.env.iter().fold(arg.to_string(), |a, (k, v)| a.replace(&format!("$({k})"), v));
        assert!(!expanded.contains("$("), "`{arg}` uses a variable the container does not define");
        expanded
    }
}

/// A container's arguments after its command's program (`command: [prog, …]` + `args`).
fn container_args(deployment: &Value, name: &str) -> Vec<String> {
    let c = container(deployment, name);
    let mut args: Vec<String> = c["command"].as_array().map(|_| strings(&c["command"], "command")).unwrap_or_default();
    if !args.is_empty() {
        args.remove(0);
    }
    args.extend(c["args"].as_array().map(|_| strings(&c["args"], "args")).unwrap_or_default());
    args
}

// === YAML everywhere ===

#[test]
fn every_yaml_document_under_deploy_parses_and_every_kubernetes_one_is_a_known_kind() {
    let mut files = vec![];
    yaml_files(&repo().join("deploy"), &mut files);
    assert!(files.iter().any(|f| f.ends_with("compose.yaml")), "deploy/compose.yaml is missing");
    for file in &files {
        assert!(!yaml_documents(file).is_empty(), "{} holds no document", file.display());
    }

    let api_version: BTreeMap<&str, &str> = [
        ("Namespace", "v1"),
        ("Secret", "v1"),
        ("ConfigMap", "v1"),
        ("Service", "v1"),
        ("Deployment", "apps/v1"),
        ("Job", "batch/v1"),
        ("PodDisruptionBudget", "policy/v1"),
    ]
    .into();
    let docs = kubernetes();
    assert!(docs.len() >= 8, "expected the whole set of manifests, found {}", docs.len());
    let mut seen = BTreeSet::new();
    for (file, doc) in &docs {
        let kind = text(&doc["kind"], &format!("kind in {file}"));
        let expected = api_version.get(kind).unwrap_or_else(|| panic!("{file}: unexpected kind {kind}"));
        assert_eq!(doc["apiVersion"], *expected, "{file}: {kind} must be apiVersion {expected}");
        let name = text(&doc["metadata"]["name"], &format!("metadata.name in {file}"));
        assert!(seen.insert((kind.to_string(), name.to_string())), "{file}: a second {kind} named {name}");
        if kind != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], "signpost", "{file}: {kind} {name} should be in the signpost namespace");
        }
    }
    object(&docs, "Namespace", "signpost");
}

// === Kubernetes ===

#[test]
fn the_registry_runs_two_probed_non_root_replicas_behind_a_service() {
    let docs = kubernetes();
    let help = help("signpost-registry");
    let deployment = object(&docs, "Deployment", "signpost-registry");
    let spec = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert!(selects(&deployment["spec"]["selector"]["matchLabels"], labels), "the Deployment's selector misses its own Pods");

    let registry = container(deployment, "registry");
    let args = container_args(deployment, "registry");
    assert_flags_known(&args, &help, "registry Deployment args");
    let listen = flag_values(&args, "--listen");
    assert_eq!(listen, ["0.0.0.0:7300"], "the registry must listen beyond loopback, on 7300");
    let ports = array(&registry["ports"], "ports");
    let http = ports.iter().find(|p| p["name"] == "http").expect("a port named http");
    assert_eq!(http["containerPort"], 7300);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")] {
        let get = &registry[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert!(get["port"] == 7300 || get["port"] == "http", "{probe} must ask the registry's port, not {}", get["port"]);
    }
    // Liveness must not kill a registry still waiting for its database: the startup probe covers it.
    let startup = &registry["startupProbe"];
    let startup_s = startup["periodSeconds"].as_u64().expect("period") * startup["failureThreshold"].as_u64().expect("threshold");
    assert!(startup_s >= 300, "the startup probe allows only {startup_s}s for the database to come");

    for key in ["cpu", "memory"] {
        assert!(registry["resources"]["requests"][key].is_string(), "registry requests.{key}");
    }
    assert!(registry["resources"]["limits"]["memory"].is_string(), "registry limits.memory");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(spec["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u != 0), "runAsUser must not be root");
    assert_eq!(registry["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(registry["securityContext"]["allowPrivilegeEscalation"], false);

    // SIGTERM after preStop; the registry drains for shutdown_grace (default 10s).
    let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let drain = flag_values(&args, "--shutdown-grace").first().map_or(Duration::from_secs(10), |d| duration(d));
    assert!(Duration::from_secs(grace) > Duration::from_secs(pre_stop_seconds(registry)) + drain, "grace {grace}s is too short");

    let service = object(&docs, "Service", "signpost-registry");
    assert!(selects(&service["spec"]["selector"], labels), "the Service selects no registry Pod");
    let port = &array(&service["spec"]["ports"], "ports")[0];
    assert_eq!(port["port"], 7300);
    assert!(port["targetPort"] == "http" || port["targetPort"] == 7300, "targetPort {}", port["targetPort"]);
    let budget = object(&docs, "PodDisruptionBudget", "signpost-registry");
    assert!(selects(&budget["spec"]["selector"]["matchLabels"], labels), "the PodDisruptionBudget selects no registry Pod");

    let job = object(&docs, "Job", "signpost-registry-migrate");
    let migrate = &array(&job["spec"]["template"]["spec"]["containers"], "containers")[0];
    let migrate_args = strings(&migrate["args"], "migrate args");
    assert!(help.commands.contains(&migrate_args[0]), "`{}` is not a subcommand of signpost-registry", migrate_args[0]);
    assert_flags_known(&migrate_args[1..], &subcommand_help("signpost-registry", "migrate"), "the migrate Job's args");
    assert_eq!(flag_values(&migrate_args, "--config"), flag_values(&args, "--config"), "the Job and the registry read one file");

    // Secrets: every key referenced exists, and every value is a marked placeholder.
    let secret = object(&docs, "Secret", "signpost");
    for (key, value) in secret["stringData"].as_object().expect("stringData") {
        assert!(text(value, key).contains("REPLACE-ME"), "Secret key {key} should be a clearly marked placeholder");
    }
    for token in ["admin-token", "agent-token"] {
        assert!(text(&secret["stringData"][token], token).len() >= 16, "{token}: the registry refuses tokens under 16 characters");
    }
    for env in [&registry["env"], &migrate["env"]] {
        for var in env.as_array().into_iter().flatten() {
            assert_env_known(text(&var["name"], "env name"), &help, "registry env");
            if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert!(secret["stringData"][key].is_string(), "the Secret has no key {key}");
            }
        }
    }
}

#[test]
fn the_example_pod_runs_the_agent_as_a_sidecar_with_its_config_identity_and_seeds() {
    let docs = kubernetes();
    let help = help("signpost-agent");
    let deployment = object(&docs, "Deployment", "example");
    let spec = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let agent = container(deployment, "signpost-agent");
    let app = container(deployment, "app");
    assert_eq!(agent["command"][0], "signpost-agent");
    let args = container_args(deployment, "signpost-agent");
    assert_flags_known(&args, &help, "agent sidecar args");

    // The downward API: the Pod's IP and name, used for the advertised addresses and the node.
    let env: BTreeMap<&str, &Value> = array(&agent["env"], "env").iter().map(|v| (text(&v["name"], "env name"), v)).collect();
    assert_eq!(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(flag_values(&args, "--address"), ["$(POD_IP)"]);
    assert_eq!(flag_values(&args, "--node"), ["$(POD_NAME)"]);
    let gossip = array(&agent["ports"], "ports").iter().find(|p| p["name"] == "gossip").expect("a gossip port");
    assert_eq!(gossip["protocol"], "UDP");
    let gossip_port = gossip["containerPort"].as_u64().expect("gossip containerPort");
    assert_eq!(flag_values(&args, "--gossip-advertise"), [format!("$(POD_IP):{gossip_port}")]);
    for name in env.keys() {
        assert_env_known(name, &help, "agent sidecar env");
    }

    // The config file comes from the ConfigMap key the volume names, and it is valid.
    let dir = tempfile::tempdir().expect("temp dir");
    let pod = PodContainer::new(&docs, deployment, "signpost-agent", ("example-test", "127.0.0.1"), dir.path());
    let config_path = flag_values(&args, "--config").pop().expect("--config");
    let local = pod.local(&config_path).unwrap_or_else(|| panic!("--config {config_path} is not on a mounted volume"));
    assert!(local.is_file(), "--config {config_path} is not a key of the mounted ConfigMap");
    let config = load_agent_config_of(&pod);
    assert_eq!(config.gossip_listen.port() as u64, gossip_port, "gossip_listen and the gossip containerPort differ");
    let keys = flag_values(&args, "--gossip-key-file").pop().expect("--gossip-key-file: gossip leaves the Pod, sealed");
    assert!(pod.local(&keys).is_some_and(|p| p.is_file()), "--gossip-key-file {keys} is not a key of a mounted Secret");
    assert!(config.listen.ip().is_loopback(), "the agent API has no token: keep it on the Pod's loopback");
    assert!(pod.local(&config.data_dir.display().to_string()).is_some(), "data_dir must be a mounted volume (read-only root)");
    let app_port = array(&app["ports"], "ports")[0]["containerPort"].as_u64().expect("app port");
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.services[0].port as u64, app_port, "the agent registers another port than the app's");
    let token = flag_values(&args, "--token-file").pop().expect("--token-file");
    assert!(pod.local(&token).is_some_and(|p| p.is_file()), "--token-file {token} is not a key of a mounted Secret");

    // Seeds: the headless Service of every agent Pod; the registry: its Service.
    let headless = object(&docs, "Service", "signpost-agents");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert!(selects(&headless["spec"]["selector"], labels), "the headless Service selects no example Pod");
    let port = &array(&headless["spec"]["ports"], "ports")[0];
    assert_eq!((port["protocol"].as_str(), port["port"].as_u64()), (Some("UDP"), Some(gossip_port)));
    assert_eq!(config.seeds, [format!("signpost-agents.signpost.svc.cluster.local:{gossip_port}")]);
    let registry_service = object(&docs, "Service", "signpost-registry");
    let url = &config.registry[0];
    assert_eq!(url.host_str(), Some("signpost-registry.signpost.svc.cluster.local"));
    assert_eq!(url.port().map(u64::from), registry_service["spec"]["ports"][0]["port"].as_u64());

    // A clean leave: the agent stops within shutdown_grace of SIGTERM, the app keeps serving
    // for its preStop meanwhile, and the grace period covers both.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let app_stop = Duration::from_secs(pre_stop_seconds(app));
    assert!(Duration::from_secs(grace) >= app_stop.max(config.shutdown_grace) + Duration::from_secs(5), "grace {grace}s is too short");
    for c in [agent, app] {
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{}: read-only root", c["name"]);
        assert!(c["resources"]["limits"]["memory"].is_string(), "{}: memory limit", c["name"]);
    }
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
}

/// The settings the agent container runs with (its mounts played by local files).
fn load_agent_config_of(pod: &PodContainer) -> AgentConfig {
    load_agent_args(&pod.args)
}

/// The registry Deployment's and the example agent's containers, played as local processes
/// (SQLite instead of PostgreSQL, loopback instead of the Pod IP): the agent, with the
/// ConfigMap's file, the downward-API environment and the Secret's token, registers its
/// service, and leaves cleanly on SIGTERM.
#[tokio::test]
async fn the_pods_containers_start_with_their_arguments_and_the_agent_leaves_cleanly() {
    let docs = kubernetes();
    let dir = tempfile::tempdir().expect("temp dir");

    let registry_port = free_port();
    let mut registry =
        PodContainer::new(&docs, object(&docs, "Deployment", "signpost-registry"), "registry", ("r", "127.0.0.1"), dir.path());
    registry.set_flag("--listen", &format!("127.0.0.1:{registry_port}"));
    // SQLite stands in for the Secret's PostgreSQL (the flag wins over the settings file).
    registry.args.push(format!("--database-url=sqlite://{}?mode=rwc", dir.path().join("registry.db").display()));
    let mut registry = Proc::start("signpost-registry", &registry.args, &registry.env, dir.path());
    let registry_url = format!("http://127.0.0.1:{registry_port}");
    registry.answers(&format!("{registry_url}/readyz"), 200).await;
    let anonymous = write_status(&format!("{registry_url}/v1/instances"), serde_json::json!({}), None).await;
    assert_eq!(anonymous, 401, "the registry should have read its tokens from the Secret's files");

    let example = object(&docs, "Deployment", "example");
    let mut agent = PodContainer::new(&docs, example, "signpost-agent", ("example-test-pod", "127.0.0.1"), dir.path());
    let config = load_agent_config_of(&agent);
    let data_dir = agent.local(&config.data_dir.display().to_string()).expect("the data mount");
    let gossip = free_udp_port();
    // Loopback stands in for the cluster's names: nothing leaves this machine.
    agent.args.extend([
        format!("--listen=127.0.0.1:{}", free_port()),
        format!("--gossip-listen=127.0.0.1:{gossip}"),
        format!("--registry={registry_url}"),
        format!("--seed=127.0.0.1:{gossip}"),
        format!("--data-dir={}", data_dir.display()),
    ]);
    let token_file = agent.local("/etc/signpost/token/agent-token").expect("the token mount");
    let token = std::fs::read_to_string(token_file).expect("the Secret's agent token").trim().to_string();
    let mut agent = Proc::start("signpost-agent", &agent.args, &agent.env, dir.path());

    let id = "example-test-pod-example-8080";
    let instance = agent.answers_as(&format!("{registry_url}/v1/instances/{id}"), 200, Some(&token)).await;
    assert_eq!(instance["node"], "example-test-pod", "--node from the Pod name");
    assert_eq!(instance["address"], "127.0.0.1", "--address from the Pod IP");
    assert_eq!(instance["tags"], serde_json::json!(["kubernetes"]));

    let (status, took) = agent.terminate().await;
    assert!(status.success(), "the agent's leave ended with {status}:\n{}", agent.log_text());
    assert!(took <= config.shutdown_grace + Duration::from_secs(1), "the leave took {took:?}");
    assert_eq!(status_of(&format!("{registry_url}/v1/instances/{id}"), &token).await, 404, "the leave should deregister");
    println!("the example agent left {took:?} after SIGTERM");
    let (status, _) = registry.terminate().await;
    assert!(status.success(), "the registry's stop ended with {status}");
}

// === compose ===

#[test]
fn compose_services_and_their_references_resolve() {
    let docs = yaml_documents(&repo().join("deploy/compose.yaml"));
    assert_eq!(docs.len(), 1);
    let compose = &docs[0];
    let services = compose["services"].as_object().expect("services");
    let volumes = compose["volumes"].as_object().cloned().unwrap_or_default();
    let registry_help = help("signpost-registry");
    let agent_help = help("signpost-agent");
    let command = |name: &str| strings(&services[name]["command"], &format!("{name} command"));

    let built: Vec<&Value> = services.values().filter(|s| s["build"].is_object()).collect();
    assert!(!built.is_empty(), "no service builds the image");
    for service in &built {
        let context = repo().join("deploy").join(text(&service["build"]["context"], "build context"));
        let dockerfile = context.join(text(&service["build"]["dockerfile"], "dockerfile"));
        assert!(dockerfile.is_file(), "build.dockerfile {} does not exist", dockerfile.display());
        assert!(context.join("Cargo.toml").is_file(), "the build context must be the workspace root");
    }

    let mut registries = BTreeMap::new();
    let mut agents = BTreeMap::new();
    let mut migrations = vec![];
    for (name, service) in services {
        for dep in service["depends_on"].as_object().into_iter().flatten().map(|(k, _)| k) {
            assert!(services.contains_key(dep), "{name} depends on {dep}, which is not a service");
        }
        for mount in service["volumes"].as_array().into_iter().flatten() {
            let source = text(mount, "volume").split(':').next().unwrap_or_default();
            assert!(volumes.contains_key(source), "{name} mounts the volume {source}, which is not declared");
        }
        if let Some(mode) = service["network_mode"].as_str() {
            let owner = mode.strip_prefix("service:").unwrap_or_else(|| panic!("{name}: network_mode {mode}"));
            assert!(services.contains_key(owner), "{name} shares the network of {owner}, which is not a service");
            assert!(services[owner]["network_mode"].is_null(), "{owner} must own its network namespace");
            assert!(services[name]["ports"].is_null(), "{name}: ports of a shared namespace belong to {owner}");
            assert!(service["depends_on"][owner].is_object(), "{name} must start after {owner}, whose namespace it joins");
        }
        let image = service["image"].as_str().unwrap_or_default();
        if image != "signpost:dev" {
            continue;
        }
        let is_agent = service["entrypoint"][0] == "signpost-agent";
        let help = if is_agent { &agent_help } else { &registry_help };
        for key in service["environment"].as_object().into_iter().flatten().map(|(k, _)| k) {
            assert_env_known(key, help, name);
        }
        let args = command(name);
        if is_agent {
            assert!(service["network_mode"].is_string(), "agent {name} must share its service's network namespace");
            agents.insert(name.clone(), args);
        } else if args.first().is_some_and(|a| !a.starts_with("--")) {
            assert!(registry_help.commands.contains(&args[0]), "{name}: `{}` is not a registry subcommand", args[0]);
            assert_flags_known(&args[1..], &subcommand_help("signpost-registry", &args[0]), name);
            migrations.push(flag_values(&args, "--database-url"));
        } else {
            registries.insert(name.clone(), args);
        }
    }
    assert_eq!(registries.len(), 2, "two registry replicas");
    assert_eq!(agents.len(), 2, "two agent sidecars");
    // Gossip leaves the containers: sealed, with one key for every agent.
    let keys: Vec<Vec<String>> = agents.values().map(|args| flag_values(args, "--gossip-key")).collect();
    assert!(keys.iter().all(|k| k.len() == 1 && *k == keys[0]), "every agent gossips with the same key: {keys:?}");

    let postgres = &services["postgres"];
    let password = postgres["environment"]["POSTGRES_PASSWORD"].as_str().expect("POSTGRES_PASSWORD");
    for (name, args) in &registries {
        assert_flags_known(args, &registry_help, name);
        assert_eq!(flag_values(args, "--listen"), ["0.0.0.0:7300"], "{name} listens beyond loopback on 7300");
        let url = flag_values(args, "--database-url").pop().expect("--database-url");
        let url = reqwest::Url::parse(&url).expect("a database URL");
        assert_eq!((url.host_str(), url.password()), (Some("postgres"), Some(password)), "{name}'s database URL");
        let check = strings(&services[name]["healthcheck"]["test"], "healthcheck").join(" ");
        assert!(check.contains("/readyz") && check.contains("/7300"), "{name}'s healthcheck must ask /readyz on 7300: {check}");
        assert_eq!(services[name]["depends_on"]["migrate"]["condition"], "service_completed_successfully");
        assert_eq!(migrations, [flag_values(args, "--database-url")], "{name} and the migration use different databases");
    }
    for (name, args) in &agents {
        assert_flags_known(args, &agent_help, name);
        let owner = text(&services[name]["network_mode"], "network_mode").trim_start_matches("service:");
        for url in flag_values(args, "--registry") {
            let url = reqwest::Url::parse(&url).expect("a registry URL");
            let host = url.host_str().unwrap_or_default();
            assert!(registries.contains_key(host), "{name}: --registry {url} is not a registry service");
            assert_eq!(url.port(), Some(7300));
        }
        let seeds = flag_values(args, "--seed");
        assert!(!seeds.is_empty(), "{name} has no seed");
        for seed in seeds {
            let (host, port) = seed.split_once(':').expect("host:port");
            let peer = agents.keys().find(|a| services[a.as_str()]["network_mode"] == format!("service:{host}"));
            assert!(peer.is_some_and(|p| p != name), "{name}: seed {seed} is no other agent's namespace");
            assert_eq!(port, "7302");
        }
        let service = flag_values(args, "--service").pop().expect("--service");
        let port = service.rsplit_once(':').expect("NAME:PORT").1;
        let app = strings(&services[owner]["command"], "app command");
        assert!(app.iter().any(|a| a == port), "{name} registers port {port}, but {owner} serves {app:?}");
        let check = flag_values(args, "--check-http").pop().expect("--check-http");
        assert!(check.starts_with(&format!("http://127.0.0.1:{port}/")), "{name} checks {check}, not its service");
        let token = flag_values(args, "--token");
        for (registry, registry_args) in &registries {
            assert_eq!(token, flag_values(registry_args, "--agent-token"), "{name}'s token is not {registry}'s agent token");
        }
    }
}

// === image ===

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut instructions = vec![];
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                instructions.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
                current.clear();
            }
        }
    }
    instructions
}

#[test]
fn the_image_builds_what_the_readme_builds_and_runs_it_unprivileged() {
    let readme = read("README.md");
    let readme_builds: Vec<&str> = readme.lines().map(str::trim).filter(|l| l.starts_with("cargo build ")).collect();
    assert_eq!(readme_builds.len(), 1, "the README should hold one build command, has {readme_builds:?}");
    let instructions = dockerfile();
    let build = instructions
        .iter()
        .filter(|i| i.starts_with("RUN "))
        .find_map(|i| {
            i.split_once("cargo build ").map(|(_, rest)| format!("cargo build {}", rest.split("&&").next().unwrap_or_default().trim()))
        })
        .expect("a RUN with cargo build");
    assert_eq!(build, readme_builds[0], "the image and the README build differently");
    for package in ["signpost-registry", "signpost-agent"] {
        assert!(build.contains(&format!("-p {package}")), "the build leaves out {package}");
    }

    let stages: Vec<usize> = instructions.iter().enumerate().filter(|(_, i)| i.starts_with("FROM ")).map(|(n, _)| n).collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let runtime = &instructions[*stages.last().expect("a stage")..];
    assert!(runtime[0].contains("-slim") || runtime[0].contains("distroless"), "a small runtime image: {}", runtime[0]);
    let find = |word: &str| runtime.iter().filter(|i| i.starts_with(word)).cloned().collect::<Vec<_>>();
    let copies = find("COPY --from=").join(" ");
    for binary in ["signpost-registry", "signpost-agent"] {
        assert!(copies.contains(&format!("/{binary}")), "the runtime image lacks {binary}");
    }
    let user = find("USER ").pop().expect("a USER");
    let uid = user.trim_start_matches("USER ").split(':').next().unwrap_or_default().to_string();
    assert!(uid != "0" && uid != "root", "the image must not run as root");
    // The binaries keep their data in ./signpost-data: the working folder must be the user's.
    let workdir = find("WORKDIR ").pop().expect("a WORKDIR");
    let data = workdir.trim_start_matches("WORKDIR ");
    assert!(runtime.iter().any(|i| i.contains(&format!("-o signpost -g signpost -m 0750 {data}"))), "{data} must belong to the user");
    let expose = find("EXPOSE ").join(" ");
    for port in ["7300/tcp", "7301/tcp", "7302/udp"] {
        assert!(expose.contains(port), "EXPOSE {port}");
    }
    assert_eq!(find("ENTRYPOINT "), [r#"ENTRYPOINT ["signpost-registry"]"#]);
    let cmd: Vec<String> = serde_json::from_str(find("CMD ").pop().expect("a CMD").trim_start_matches("CMD ")).expect("CMD as JSON");
    assert_flags_known(&cmd, &help("signpost-registry"), "the image's CMD");
    assert_eq!(flag_values(&cmd, "--listen"), ["0.0.0.0:7300"]);

    // The build context is the workspace root: nothing cargo reads may be ignored.
    let ignored: Vec<String> =
        read(".dockerignore").lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    assert!(ignored.iter().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore must leave out target/");
    let manifest = read("Cargo.toml");
    let members = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("workspace members");
    let needed: Vec<&str> = members.split('"').skip(1).step_by(2).chain(["migrations", "Cargo.toml", "Cargo.lock"]).collect();
    for path in needed {
        assert!(!ignored.iter().any(|l| l.trim_end_matches('/') == path), ".dockerignore leaves out {path}, which the build needs");
    }
}

// === systemd ===

/// A unit file's `Key=Value` lines (comments and section headers dropped).
fn unit(name: &str) -> Vec<(String, String)> {
    read(&format!("deploy/systemd/{name}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{name}: `{l}` is not Key=Value"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn unit_values(unit: &[(String, String)], key: &str) -> Vec<String> {
    unit.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
}

fn unit_value(unit: &[(String, String)], key: &str) -> String {
    let mut values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{key} should be set once");
    values.remove(0)
}

/// The file a unit's `LoadCredential=NAME:FILE` loads.
fn loaded_from(unit: &[(String, String)], name: &str) -> Option<String> {
    unit_values(unit, "LoadCredential").iter().find_map(|c| c.strip_prefix(&format!("{name}:")).map(str::to_string))
}

/// A unit's ExecStart arguments, with its specifiers and /etc/signpost files played here.
struct UnitCommand {
    program: String,
    args: Vec<String>,
    state_dir: PathBuf,
    credentials: PathBuf,
}

fn unit_command(unit: &[(String, String)], dir: &Path) -> UnitCommand {
    let exec = unit_value(unit, "ExecStart");
    let mut words = exec.split_whitespace();
    let program = words.next().expect("a program").rsplit('/').next().unwrap_or_default().to_string();
    let state_dir = dir.join("state");
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials folder");
    let examples = repo().join("deploy/systemd");
    // LoadCredential=NAME:/etc/signpost/FILE: systemd copies FILE; the shipped examples stand in
    // for those under /etc/signpost (the tokens are not shipped: the caller writes them).
    for credential in unit_values(unit, "LoadCredential") {
        let (name, source) = credential.split_once(':').expect("LoadCredential=NAME:PATH");
        let example = examples.join(source.trim_start_matches("/etc/signpost/"));
        if example.is_file() {
            std::fs::copy(&example, credentials.join(name)).expect("copy a credential");
        }
    }
    let args = words
        .map(|w| {
            w.replace("%S", &state_dir.display().to_string())
                .replace("%d", &credentials.display().to_string())
                .replace("/etc/signpost", &examples.display().to_string())
        })
        .collect::<Vec<String>>();
    // systemd makes the StateDirectory before it starts the service.
    for data_dir in flag_values(&args, "--data-dir") {
        std::fs::create_dir_all(data_dir).expect("state folder");
    }
    UnitCommand { program, args, state_dir, credentials }
}

#[test]
fn the_systemd_units_are_hardened_and_their_command_lines_known() {
    for (file, binary_name, config) in
        [("signpost-registry.service", "signpost-registry", "registry.toml"), ("signpost-agent.service", "signpost-agent", "agent.toml")]
    {
        let unit = unit(file);
        let help = help(binary_name);
        for (key, value) in [
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
        ] {
            assert_eq!(unit_value(&unit, key), value, "{file}: {key}");
        }
        let exec = unit_value(&unit, "ExecStart");
        let args: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
        assert_eq!(args[0], format!("/usr/local/bin/{binary_name}"), "{file} runs another program");
        assert_flags_known(&args[1..], &help, file);
        // The state folder systemd makes is the one the binary writes to.
        let state = unit_value(&unit, "StateDirectory");
        assert_eq!(flag_values(&args, "--data-dir"), [format!("%S/{state}")], "{file}: --data-dir");
        // Every credential used is loaded, and every loaded file is an example here or documented.
        for arg in args.iter().filter(|a| a.starts_with("%d/")) {
            assert!(loaded_from(&unit, &arg[3..]).is_some(), "{file}: {arg} is not a LoadCredential");
        }
        // --config is the shipped example, installed in /etc/signpost, read directly or as a credential.
        let config_arg = flag_values(&args, "--config").pop().expect("--config");
        let installed = match config_arg.strip_prefix("%d/") {
            Some(name) => loaded_from(&unit, name).unwrap_or_else(|| panic!("{file}: no LoadCredential for {config_arg}")),
            None => config_arg,
        };
        assert_eq!(installed, format!("/etc/signpost/{config}"), "{file}: --config");
        assert!(repo().join("deploy/systemd").join(config).is_file(), "{config} is not shipped");
        assert!(
            unit_values(&unit, "Environment").is_empty() && unit_values(&unit, "EnvironmentFile").is_empty(),
            "{file}: settings come as flags and files"
        );
        // systemd's stop deadline outlasts the binary's own drain.
        let stop = duration(&unit_value(&unit, "TimeoutStopSec"));
        let grace = read(&format!("deploy/systemd/{config}"))
            .lines()
            .find_map(|l| l.strip_prefix("shutdown_grace = ").map(|v| duration(v.trim_matches('"'))))
            .expect("shutdown_grace in the example config");
        assert!(stop >= grace + Duration::from_secs(5), "{file}: TimeoutStopSec {stop:?} vs shutdown_grace {grace:?}");
    }
    // The agent's settings as its unit starts it (the gossip key, a credential, played here).
    let dir = tempfile::tempdir().expect("temp dir");
    let agent_unit = unit_command(&unit("signpost-agent.service"), dir.path());
    std::fs::write(agent_unit.credentials.join("agent-token"), "a-test-agent-token-0123456789\n").expect("token");
    std::fs::write(agent_unit.credentials.join("gossip-keys"), format!("{}\n", keygen())).expect("key");
    let agent = load_agent_args(&agent_unit.args);
    assert_eq!(agent.services.len(), 2);
    assert_eq!(agent.registry.len(), 2, "the example shows fail-over");
}

/// The registry and the agent run with their units' command lines, environment files and
/// example configs (credentials and state folders played here; SQLite instead of PostgreSQL),
/// and the compose healthcheck asks the registry for real.
#[tokio::test]
async fn the_units_start_the_real_binaries_and_the_compose_healthcheck_works() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry_dir = dir.path().join("registry");
    let registry_unit = unit_command(&unit("signpost-registry.service"), &registry_dir);
    let agent_token = "a-test-agent-token-0123456789";
    std::fs::write(registry_unit.credentials.join("admin-token"), "a-test-admin-token-0123456789\n").expect("token");
    std::fs::write(registry_unit.credentials.join("agent-token"), format!("{agent_token}\n")).expect("token");
    std::fs::create_dir_all(&registry_unit.state_dir).expect("state folder");
    let port = free_port();
    let mut args = registry_unit.args.clone();
    // Loopback and SQLite stand in for the example's address and PostgreSQL (flags win over the file).
    args.push(format!("--listen=127.0.0.1:{port}"));
    args.push(format!("--database-url=sqlite://{}?mode=rwc", registry_unit.state_dir.join("test.db").display()));
    let mut registry = Proc::start(&registry_unit.program, &args, &[], dir.path());
    let url = format!("http://127.0.0.1:{port}");
    registry.answers(&format!("{url}/readyz"), 200).await;
    assert_eq!(write_status(&format!("{url}/v1/instances"), serde_json::json!({}), None).await, 401, "tokens from the credentials");

    // The compose healthcheck, as docker would run it, against this registry and a closed port.
    let compose = &yaml_documents(&repo().join("deploy/compose.yaml"))[0];
    let test = strings(&compose["services"]["registry-1"]["healthcheck"]["test"], "healthcheck");
    assert_eq!(test[0], "CMD");
    let run_check = |port: u16| {
        let args: Vec<String> = test[2..].iter().map(|a| a.replace("/7300", &format!("/{port}"))).collect();
        Command::new(&test[1]).args(args).stderr(Stdio::null()).status().expect("run the healthcheck").success()
    };
    assert!(run_check(port), "the compose healthcheck fails against a ready registry");
    assert!(!run_check(free_port()), "the compose healthcheck passes with nothing listening");

    let agent_dir = dir.path().join("agent");
    let agent_unit = unit_command(&unit("signpost-agent.service"), &agent_dir);
    std::fs::write(agent_unit.credentials.join("agent-token"), format!("{agent_token}\n")).expect("token");
    std::fs::write(agent_unit.credentials.join("gossip-keys"), format!("{}\n", keygen())).expect("key");
    let gossip = free_udp_port();
    let mut args = agent_unit.args.clone();
    // Loopback stands in for the example's registries and seed: nothing leaves this machine.
    args.extend([
        format!("--listen=127.0.0.1:{}", free_port()),
        format!("--gossip-listen=127.0.0.1:{gossip}"),
        format!("--registry={url}"),
        format!("--seed=127.0.0.1:{gossip}"),
    ]);
    let mut agent = Proc::start(&agent_unit.program, &args, &[], dir.path());
    for id in ["web-host-1-web-8080", "web-host-1-worker-9000"] {
        let instance = agent.answers_as(&format!("{url}/v1/instances/{id}"), 200, Some(agent_token)).await;
        assert_eq!(instance["zone"], "eu-1");
    }
    let (status, took) = agent.terminate().await;
    assert!(status.success(), "the agent's leave ended with {status}:\n{}", agent.log_text());
    assert!(agent_unit.state_dir.join("signpost-agent/catalog-cache.bin").is_file(), "the cache is saved in the state folder");
    assert_eq!(status_of(&format!("{url}/v1/instances/web-host-1-web-8080"), agent_token).await, 404, "the leave should deregister");
    println!("the host agent left {took:?} after SIGTERM");
    let (status, took) = registry.terminate().await;
    assert!(status.success(), "the registry's stop ended with {status}:\n{}", registry.log_text());
    println!("the registry stopped {took:?} after SIGTERM");
}
