//! Test harness: the real `localup` binary started as relay and client processes on
//! loopback, plus small echo servers, so tests exercise exactly what users run.

#![allow(dead_code)] // each test binary uses a different subset

pub mod inprocess;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const SECRET: &str = "my-jwt-secret";
pub const BIN: &str = env!("CARGO_BIN_EXE_localup");
/// Generous: CI machines are small and busy.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Output lines of a child process (stdout and stderr interleaved), with waiting.
#[derive(Clone, Default)]
pub struct Output(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Output {
    fn capture(&self, stream: impl Read + Send + 'static) {
        let output = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let (lines, changed) = &*output.0;
                lines.lock().unwrap().push(line);
                changed.notify_all();
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.0.lock().unwrap().join("\n")
    }

    /// Waits for the `nth` (1-based) line containing `needle` and returns it.
    pub fn wait_for_nth(&self, needle: &str, nth: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.0;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard
                .iter()
                .filter(|line| line.contains(needle))
                .nth(nth - 1)
            {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no line #{nth} containing {needle:?} within {timeout:?}; output:\n{}",
                guard.join("\n")
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_nth(needle, 1, timeout)
    }
}

/// A child process that is killed when dropped, so failing tests leave nothing behind.
pub struct Process {
    pub child: Child,
    pub output: Output,
}

impl Process {
    pub fn spawn(mut command: Command) -> Self {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("cannot start process");
        let output = Output::default();
        output.capture(child.stdout.take().unwrap());
        output.capture(child.stderr.take().unwrap());
        Self { child, output }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain what the process printed last.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process still running after {timeout:?}; output:\n{}",
                self.output.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory used as HOME, so certificates and pins stay per test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "localup-test-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port free for UDP and TCP both, as a relay's control port must be (QUIC, and TLS
/// on TCP on the same number).
pub fn free_udp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `len` consecutive TCP ports that are free now, away from the ephemeral range.
pub fn free_port_range(len: u16) -> (u16, u16) {
    loop {
        let start = 20_000 + rand::random::<u16>() % 12_000;
        let end = start + len - 1;
        if (start..=end).all(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()) {
            return (start, end);
        }
    }
}

/// A token from `localup generate-token` with the README's flags.
pub fn token(sub: &str) -> String {
    generate_token(&["--sub", sub])
}

/// A token whose clients share one port.
pub fn pool_token(sub: &str) -> String {
    generate_token(&["--sub", sub, "--pool"])
}

pub fn generate_token(args: &[&str]) -> String {
    let output = Command::new(BIN)
        .args(["generate-token", "--secret", SECRET, "--token-only"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

pub struct Relay {
    pub process: Process,
    pub control_port: u16,
    pub admin_port: u16,
    pub range: (u16, u16),
    pub home: PathBuf,
}

pub struct RelayOptions {
    pub range: (u16, u16),
    pub control_port: Option<u16>,
    pub home: Option<PathBuf>,
    pub extra: Vec<String>,
}

impl RelayOptions {
    pub fn range(range: (u16, u16)) -> Self {
        Self {
            range,
            control_port: None,
            home: None,
            extra: Vec::new(),
        }
    }
}

impl Relay {
    pub fn start(range_len: u16) -> Self {
        Self::start_with(RelayOptions::range(free_port_range(range_len)))
    }

    /// Starts `localup relay tcp` with the README's flags and waits until it serves.
    pub fn start_with(options: RelayOptions) -> Self {
        let control_port = options.control_port.unwrap_or_else(free_udp_port);
        let admin_port = free_tcp_port();
        let home = options.home.unwrap_or_else(|| scratch_dir("relay"));
        let mut command = Command::new(BIN);
        command
            .args(["relay", "tcp", "--localup-addr"])
            .arg(format!("127.0.0.1:{control_port}"))
            .arg("--tcp-port-range")
            .arg(format!("{}-{}", options.range.0, options.range.1))
            .args(["--jwt-secret", SECRET, "--admin-addr"])
            .arg(format!("127.0.0.1:{admin_port}"))
            .args(&options.extra)
            .env("HOME", &home)
            .env_remove("XDG_DATA_HOME");
        let process = Process::spawn(command);
        process.output.wait_for("relay listening", STARTUP);
        Self {
            process,
            control_port,
            admin_port,
            range: options.range,
            home,
        }
    }

    pub fn addr(&self) -> String {
        format!("localhost:{}", self.control_port)
    }

    /// GET on the admin endpoint; returns (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path)
    }

    /// The value of the metric line that is exactly `name` (labels included); fails
    /// when there is none.
    pub fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "{body}");
        inprocess::metric_value(&body, name)
    }
}

pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_with(port, path, &[])
}

/// `http_get` with extra request headers (name, value).
pub fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    // A server that accepts but never answers fails the test instead of hanging it.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub struct Client {
    pub process: Process,
    pub home: PathBuf,
}

impl Client {
    /// Runs `localup --port P --protocol tcp --relay R --token T [extra]` without waiting.
    pub fn spawn(
        relay: &str,
        local_port: u16,
        token: &str,
        extra: &[&str],
        home: &Path,
    ) -> Process {
        let mut command = Command::new(BIN);
        command
            .args([
                "--port",
                &local_port.to_string(),
                "--protocol",
                "tcp",
                "--relay",
                relay,
            ])
            .args(["--token", token])
            .args(extra)
            .env("HOME", home)
            .env_remove("XDG_CONFIG_HOME");
        Process::spawn(command)
    }

    /// Starts a client and waits for its success line; returns it and the port.
    pub fn start(relay: &Relay, local_port: u16, token: &str, extra: &[&str]) -> (Self, u16) {
        let home = scratch_dir("client");
        Self::start_in(relay, local_port, token, extra, home)
    }

    pub fn start_in(
        relay: &Relay,
        local_port: u16,
        token: &str,
        extra: &[&str],
        home: PathBuf,
    ) -> (Self, u16) {
        let process = Self::spawn(&relay.addr(), local_port, token, extra, &home);
        let line = process.output.wait_for("✅ TCP tunnel created: ", STARTUP);
        let port = parse_tunnel_port(&line);
        (Self { process, home }, port)
    }
}

pub fn parse_tunnel_port(line: &str) -> u16 {
    let addr = line.rsplit(' ').next().unwrap();
    assert!(
        addr.starts_with("localhost:"),
        "unexpected address in {line:?}"
    );
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Runs a client expected to fail; returns its combined output after it exits non-zero.
pub fn expect_client_failure(relay: &str, token: &str, extra: &[&str]) -> String {
    let home = scratch_dir("client");
    let mut process = Client::spawn(relay, free_tcp_port(), token, extra, &home);
    let status = process.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "client should have failed; output:\n{}",
        process.output.text()
    );
    process.output.text()
}

/// A TCP echo server on a free loopback port, one thread per connection.
pub fn echo_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Sends `data` and reads back the echo concurrently (so large payloads cannot
/// deadlock on full buffers), half-closing after the last byte.
pub fn echo_round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let stream = connect(port);
    let mut writer = stream.try_clone().unwrap();
    let payload = data.to_vec();
    let sender = thread::spawn(move || {
        writer.write_all(&payload).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut received = Vec::with_capacity(data.len());
    (&stream).read_to_end(&mut received).unwrap();
    sender.join().unwrap();
    received
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    bytes
}

/// Polls `condition` until it holds, failing with `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn port_accepts(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The path of a tool from Debian's packages, failing clearly when it is missing.
pub fn tool(name: &str, candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-deps.sh"))
}
