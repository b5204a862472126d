//! A throwaway PostgreSQL cluster for one test: `initdb` and `pg_ctl` from Debian's packages
//! in a temporary directory (as the `postgres` user when the tests run as root, since the
//! server refuses to run as root), on a free loopback port, stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the tests require when `.ci/run` says so.
pub const REQUIRE: &str = "REQUIRE_POSTGRES";

/// The superuser's name in every throwaway cluster.
pub const USER: &str = "relay";

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// The superuser's password (host connections use SCRAM).
    pub password: String,
}

/// The directory of the newest installed server's programs.
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

impl Cluster {
    /// Starts a cluster, or says SKIPPED (a failure under `REQUIRE_POSTGRES`) and gives `None`
    /// when no server is installed.
    pub fn start(test: &str) -> Option<Cluster> {
        let Some(bin) = server_bin() else {
            super::skip_unless_required(test, REQUIRE, "no PostgreSQL server (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("relay-pg").tempdir().expect("tempdir");
        let password = format!("pw-{}", relay::crypto::hex(&relay::crypto::random_bytes::<8>()));
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).expect("write pwfile");
        if super::is_root() {
            let (uid, gid) = postgres_ids();
            for p in [dir.path(), &pwfile] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown to postgres");
            }
        }
        let cluster = Cluster {
            port: 0,
            dir,
            bin,
            password,
        };
        let data = cluster.data();
        let out = cluster
            .run("initdb")
            .args([
                "-D",
                &data,
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let mut cluster = cluster;
        cluster.port = free_port();
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        Some(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A command running `program` of the server, as the `postgres` user when root.
    fn run(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if super::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Runs `pg_ctl` with `args` (start and restart get the cluster's options).
    pub fn pg_ctl(&self, args: &[&str]) {
        let mut cmd = self.run("pg_ctl");
        cmd.args(["-D", &self.data(), "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(args);
        if args.first().is_some_and(|a| *a == "start" || *a == "restart") {
            cmd.arg("-o").arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on -c max_connections=200",
                self.port,
                self.dir.path().display()
            ));
        }
        let out = cmd.output().expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Restarts the server without a clean shutdown (`-m immediate`: as after a crash).
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "60"]);
    }

    /// Makes database `name` and gives its URL (password included).
    pub async fn database(&self, name: &str) -> String {
        let admin = self.url("postgres");
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin}: {e}\n{}", self.log()));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        self.url(name)
    }

    /// The URL of database `name`, password included.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}:{}@127.0.0.1:{}/{name}", self.password, self.port)
    }

    /// Runs `sql` (one statement) in database `name` as the superuser and gives its rows.
    pub async fn sql(&self, name: &str, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, conn) = tokio_postgres::connect(&self.url(name), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The directory the cluster lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .run("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

/// The `postgres` user's ids (the package makes that user).
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("the postgres user (made by the postgresql package)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}
