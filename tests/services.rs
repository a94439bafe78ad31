//! Real servers from Debian's packages, reached with their real clients through the
//! tunnel: the README's walkthrough end to end (psql), plus Redis and SSH.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn postgres_bin(name: &str) -> std::path::PathBuf {
    let versions =
        ["17", "16", "15", "14", "13"].map(|v| format!("/usr/lib/postgresql/{v}/bin/{name}"));
    let candidates: Vec<&str> = versions.iter().map(String::as_str).collect();
    tool("PostgreSQL", &candidates)
}

/// A private PostgreSQL cluster on a free port, run as the `postgres` user (it refuses root).
fn start_postgres() -> (Process, u16) {
    let dir = scratch_dir("pg");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.join("data");
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin("initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data));
    let port = free_tcp_port();
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&dir)
        .args(["-c", "listen_addresses=127.0.0.1"]);
    let server = Process::spawn(command);
    server
        .output
        .wait_for("ready to accept connections", STARTUP);
    (server, port)
}

#[test]
#[ignore = "needs PostgreSQL, Redis and OpenSSH from scripts/install-deps.sh; scripts/test.sh runs it"]
fn psql_reaches_postgres_through_the_tunnel_as_in_the_reference() {
    let psql = tool("psql", &["/usr/bin/psql"]);
    let (_postgres, pg_port) = start_postgres();
    run(Command::new(&psql).args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg_port.to_string(),
        "-U",
        "postgres",
        "-c",
        "CREATE DATABASE mydb",
    ]));

    let relay = Relay::start(10);
    let remote = (relay.range.0 + 5).to_string();
    let (_client, port) = Client::start(
        &relay,
        pg_port,
        &token("mydb"),
        &[&format!("--remote-port={remote}")],
    );

    let answer = run(Command::new(&psql).args([
        "-h",
        "localhost",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-tAc",
        "SELECT 6 * 7",
    ]));
    assert_eq!(answer.trim(), "42");
    let url = format!("postgresql://postgres@localhost:{port}/mydb");
    let answer = run(Command::new(&psql)
        .arg(&url)
        .args(["-tAc", "SELECT current_database()"]));
    assert_eq!(answer.trim(), "mydb");
    // A real workload: a table with many rows, written and read back.
    run(Command::new(&psql).arg(&url).args([
        "-c",
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g",
    ]));
    let count = run(Command::new(&psql)
        .arg(&url)
        .args(["-tAc", "SELECT count(*), sum(length(v)) FROM t"]));
    assert_eq!(count.trim(), "50000|1600000");
}

#[test]
#[ignore = "needs PostgreSQL, Redis and OpenSSH from scripts/install-deps.sh; scripts/test.sh runs it"]
fn redis_cli_works_through_the_tunnel() {
    let server_bin = tool("redis-server", &["/usr/bin/redis-server"]);
    let cli = tool("redis-cli", &["/usr/bin/redis-cli"]);
    let redis_port = free_tcp_port();
    let mut command = Command::new(server_bin);
    command.args([
        "--port",
        &redis_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let server = Process::spawn(command);
    server
        .output
        .wait_for("Ready to accept connections", STARTUP);

    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, redis_port, &token("cache"), &[]);
    let cli = |args: &[&str]| {
        run(Command::new(&cli)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args))
    };
    assert_eq!(cli(&["SET", "greeting", "through-the-tunnel"]).trim(), "OK");
    assert_eq!(cli(&["GET", "greeting"]).trim(), "through-the-tunnel");
    // Under the kernel's 128 KiB limit for one command-line argument.
    let big = "x".repeat(100_000);
    cli(&["SET", "big", &big]);
    assert_eq!(cli(&["STRLEN", "big"]).trim(), "100000");
}

#[test]
#[ignore = "needs PostgreSQL, Redis and OpenSSH from scripts/install-deps.sh; scripts/test.sh runs it"]
fn an_ssh_session_runs_through_the_tunnel() {
    let sshd = tool("sshd", &["/usr/sbin/sshd"]);
    let dir = scratch_dir("ssh");
    let keygen = |path: &Path| {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path));
    };
    keygen(&dir.join("host_key"));
    keygen(&dir.join("user_key"));
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let ssh_port = free_tcp_port();
    let config = format!(
        "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
         PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {dir}/sshd.pid\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let mut command = Command::new(sshd);
    command
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"));
    let server = Process::spawn(command);
    server.output.wait_for("Server listening", STARTUP);

    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, ssh_port, &token("ssh"), &[]);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let output = run(Command::new("ssh")
        .arg("-i")
        .arg(dir.join("user_key"))
        .args([
            "-p",
            &port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        .arg(format!("{user}@127.0.0.1"))
        .arg("echo tunneled-ssh; head -c 1000000 /dev/zero | wc -c"));
    assert_eq!(output, "tunneled-ssh\n1000000\n");
}
