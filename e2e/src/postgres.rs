//! PostgreSQL for tests: a fresh database per test on the shared server, and a throwaway
//! server (initdb + pg_ctl from the installed binaries) for tests that stop the database.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("SIGNPOST_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn with_database(server: &str, name: &str) -> String {
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(server);
    format!("{base}/{name}")
}

/// A database of its own, dropped when the value is.
pub struct TestDb {
    server: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates `signpost_test_<random>` on the test server.
    pub async fn create() -> TestDb {
        Self::create_on(&server_url()).await
    }

    /// Creates a database on the server at `server`.
    pub async fn create_on(server: &str) -> TestDb {
        let name = format!("signpost_test_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(server).await.unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {server}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.expect("create the test database");
        let _ = conn.close().await;
        TestDb { url: with_database(server, &name), server: server.to_string(), name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&server).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// A PostgreSQL server of the test's own, in a temporary folder, on a port of its own.
pub struct ThrowawayPostgres {
    control: Control,
    _dir: tempfile::TempDir,
}

/// Starts and stops a throwaway server (blocking: call it from `spawn_blocking`).
#[derive(Debug, Clone)]
pub struct Control {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl ThrowawayPostgres {
    /// Runs initdb and starts the server.
    pub fn start() -> ThrowawayPostgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::Builder::new().prefix("signpost-pg-").tempdir().expect("temp dir");
        let as_postgres_user = is_root();
        if as_postgres_user {
            // PostgreSQL refuses to run as root: hand the folder to the postgres user.
            chown_to_postgres(dir.path());
        }
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let control = Control { bin, data, log, port: crate::free_port(), as_postgres_user };
        let data_arg = control.data.display().to_string();
        control.run("initdb", &["-D", &data_arg, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        control.start();
        ThrowawayPostgres { control, _dir: dir }
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.control.port)
    }

    /// A handle that starts and stops it.
    pub fn control(&self) -> Control {
        self.control.clone()
    }
}

impl Control {
    /// Starts the server (again).
    pub fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.data.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
        );
        let (data, log) = (self.data.display().to_string(), self.log.display().to_string());
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"]);
    }

    /// Stops the server at once (connections are cut).
    pub fn stop(&self) {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let output = if self.as_postgres_user {
            Command::new("runuser").arg("-u").arg("postgres").arg("--").arg(&path).args(args).output()
        } else {
            Command::new(&path).args(args).output()
        }
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        if !output.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "{program} failed: {}\n{}\n{}\nserver log:\n{log}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let control = &self.control;
        let data = control.data.display().to_string();
        let path = control.bin.join("pg_ctl");
        let _ = if control.as_postgres_user {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(["-D", &data, "-m", "immediate", "stop"]).output()
        } else {
            Command::new(&path).args(["-D", &data, "-m", "immediate", "stop"]).output()
        };
    }
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<version>/bin`), or the
/// folder named by `SIGNPOST_TEST_PG_BIN`.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SIGNPOST_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or set SIGNPOST_TEST_PG_BIN)")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect("an installed PostgreSQL server with initdb")
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn chown_to_postgres(path: &Path) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("id postgres");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("the postgres user exists")
    };
    std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g"))).expect("chown the throwaway folder");
}
