//! `localup-fault-proxy`: the fault proxy as a process. Faults are set by flags at
//! start and changed at run time by lines on stdin; each line is answered on stdout
//! with `ok`, the counters (`stats`) or `error: ...`.
//!
//! ```text
//! delay 50ms              one-way delay, each direction
//! loss 0.05               drop probability per datagram (UDP)
//! reorder off | reorder hold EVERY AFTER | reorder jitter 20ms     (UDP)
//! blackhole on | blackhole off
//! cut                     reset TCP connections, forget UDP flows
//! stats                   one line per proxy: forwarded=... lost=... ...
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use localup_fault_proxy::{FaultProxy, Kind, Reorder};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(
    name = "localup-fault-proxy",
    about = "Forward UDP and/or TCP on loopback, injecting delay, loss, reordering, blackholes and cuts"
)]
struct Cli {
    /// Proxy UDP
    #[arg(long, required_unless_present = "tcp")]
    udp: bool,
    /// Proxy TCP (with --udp too: both on the same port number)
    #[arg(long)]
    tcp: bool,
    /// Address to listen on; port 0 picks a free one
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to forward to
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay added to each direction, e.g. 50ms
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Probability of dropping each datagram, 0..=1 (UDP)
    #[arg(long, value_parser = parse_probability)]
    loss: Option<f64>,
    /// `hold:EVERY:AFTER` or `jitter:DURATION` (UDP)
    #[arg(long, value_parser = parse_reorder_flag)]
    reorder: Option<Reorder>,
    /// Start with the link blackholed
    #[arg(long)]
    blackhole: bool,
}

#[derive(Debug, PartialEq)]
enum Command {
    Delay(Duration),
    Loss(f64),
    Reorder(Reorder),
    Blackhole(bool),
    Cut,
    Stats,
}

fn parse_command(line: &str) -> anyhow::Result<Command> {
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["delay", delay] => Command::Delay(humantime::parse_duration(delay)?),
        ["loss", probability] => Command::Loss(parse_probability(probability)?),
        ["reorder", rest @ ..] => Command::Reorder(parse_reorder(rest)?),
        ["blackhole", "on"] => Command::Blackhole(true),
        ["blackhole", "off"] => Command::Blackhole(false),
        ["cut"] => Command::Cut,
        ["stats"] => Command::Stats,
        _ => bail!(
            "unknown command {line:?}; expected delay D | loss P | reorder off|hold N M|jitter D \
             | blackhole on|off | cut | stats"
        ),
    })
}

fn parse_probability(text: &str) -> anyhow::Result<f64> {
    let probability: f64 = text.parse().context("loss must be a number")?;
    if !(0.0..=1.0).contains(&probability) {
        bail!("loss must be between 0 and 1, got {probability}");
    }
    Ok(probability)
}

fn parse_reorder(words: &[&str]) -> anyhow::Result<Reorder> {
    Ok(match words {
        ["off"] => Reorder::Off,
        ["hold", every, after] => Reorder::Hold {
            every: every.parse().context("hold EVERY must be a count")?,
            after: after.parse().context("hold AFTER must be a count")?,
        },
        ["jitter", max] => Reorder::Jitter(humantime::parse_duration(max)?),
        _ => bail!("reorder takes off, hold EVERY AFTER or jitter DURATION"),
    })
}

fn parse_reorder_flag(text: &str) -> anyhow::Result<Reorder> {
    parse_reorder(&text.split(':').collect::<Vec<_>>())
}

fn apply(proxies: &[FaultProxy], command: &Command) -> String {
    for proxy in proxies {
        match *command {
            Command::Delay(delay) => proxy.set_delay(delay),
            Command::Loss(probability) => proxy.set_loss(probability),
            Command::Reorder(reorder) => proxy.set_reorder(reorder),
            Command::Blackhole(on) => proxy.blackhole(on),
            Command::Cut => proxy.cut(),
            Command::Stats => {}
        }
    }
    if *command != Command::Stats {
        return "ok".into();
    }
    let lines: Vec<String> = proxies
        .iter()
        .map(|proxy| {
            let stats = proxy.stats();
            format!(
                "{} forwarded={} lost={} blackholed={} reordered={} flows={} cut={}",
                name(proxy.kind()),
                stats.forwarded,
                stats.lost,
                stats.blackholed,
                stats.reordered,
                stats.flows,
                stats.cut
            )
        })
        .collect();
    lines.join("\n")
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Udp => "udp",
        Kind::Tcp => "tcp",
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut proxies = Vec::new();
    let mut listen = cli.listen;
    if cli.udp {
        let proxy = FaultProxy::udp(listen, cli.upstream)
            .await
            .with_context(|| format!("cannot listen on UDP {listen}"))?;
        // TCP then takes the port UDP got, so both share one port number.
        listen = proxy.local_addr();
        proxies.push(proxy);
    }
    if cli.tcp {
        let proxy = FaultProxy::tcp(listen, cli.upstream)
            .await
            .with_context(|| format!("cannot listen on TCP {listen}"))?;
        proxies.push(proxy);
    }
    let mut initial = Vec::new();
    initial.extend(cli.delay.map(Command::Delay));
    initial.extend(cli.loss.map(Command::Loss));
    initial.extend(cli.reorder.map(Command::Reorder));
    if cli.blackhole {
        initial.push(Command::Blackhole(true));
    }
    for command in &initial {
        apply(&proxies, command);
    }
    for proxy in &proxies {
        println!(
            "listening on {} {} -> {}",
            name(proxy.kind()),
            proxy.local_addr(),
            cli.upstream
        );
    }

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line.context("cannot read stdin")? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match parse_command(&line) {
                    Ok(command) => println!("{}", apply(&proxies, &command)),
                    Err(error) => println!("error: {error:#}"),
                },
                // Without stdin the faults can no longer change; keep forwarding.
                None => std::future::pending::<()>().await,
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        let ms = Duration::from_millis;
        assert_eq!(parse_command("delay 50ms").unwrap(), Command::Delay(ms(50)));
        assert_eq!(parse_command(" loss 0.05 ").unwrap(), Command::Loss(0.05));
        assert_eq!(
            parse_command("reorder hold 3 2").unwrap(),
            Command::Reorder(Reorder::Hold { every: 3, after: 2 })
        );
        assert_eq!(
            parse_command("reorder jitter 20ms").unwrap(),
            Command::Reorder(Reorder::Jitter(ms(20)))
        );
        assert_eq!(
            parse_command("reorder off").unwrap(),
            Command::Reorder(Reorder::Off)
        );
        assert_eq!(
            parse_command("blackhole on").unwrap(),
            Command::Blackhole(true)
        );
        assert_eq!(parse_command("cut").unwrap(), Command::Cut);
        assert_eq!(parse_command("stats").unwrap(), Command::Stats);
    }

    #[test]
    fn bad_commands_say_what_is_expected() {
        assert!(parse_command("loss 1.5").is_err());
        assert!(parse_command("delay soon").is_err());
        assert!(parse_command("reorder hold 3").is_err());
        let error = parse_command("explode").unwrap_err().to_string();
        assert!(error.contains("blackhole on|off"), "{error}");
    }

    #[test]
    fn reorder_flag_uses_colons() {
        assert_eq!(
            parse_reorder_flag("hold:4:2").unwrap(),
            Reorder::Hold { every: 4, after: 2 }
        );
        assert_eq!(
            parse_reorder_flag("jitter:5ms").unwrap(),
            Reorder::Jitter(Duration::from_millis(5))
        );
    }
}
