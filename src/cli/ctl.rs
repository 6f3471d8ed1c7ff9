//! `fvd ctl`: a small QMP client for humans, for the control socket of `fvd serve --control`.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The control socket (`fvd serve --control PATH`).
    pub socket: PathBuf,
    /// The command, e.g. query-block, query-blockstats, block-job-pause, quit.
    #[arg(required_unless_present = "events")]
    pub command: Option<String>,
    /// The command's arguments as a JSON object, e.g. '{"device": "prefetch"}'.
    pub arguments: Option<String>,
    /// Print events (one JSON object a line) until interrupted, instead of running a command.
    #[arg(long, conflicts_with_all = ["command", "arguments"])]
    pub events: bool,
}

/// Longest line accepted from the server: far above any reply fvd sends.
const MAX_LINE: u64 = 16 << 20;

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = Read::take(&mut self.reader, MAX_LINE)
            .read_line(&mut line)
            .context("reading from the control socket")?;
        if n == 0 {
            bail!("the server closed the control socket");
        }
        serde_json::from_str(&line).context("the server sent invalid JSON")
    }

    /// Sends `cmd` and returns its reply, skipping events.
    fn execute(&mut self, cmd: &str, args: Option<Value>, id: u64) -> anyhow::Result<Value> {
        let mut msg = json!({"execute": cmd, "id": id});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .context("writing to the control socket")?;
        loop {
            let v = self.read()?;
            if v.get("event").is_none() && v.get("id") == Some(&json!(id)) {
                return Ok(v);
            }
        }
    }
}

/// Runs `fvd ctl`; exit status 1 when the server answers with an error.
pub fn run(a: Args) -> anyhow::Result<i32> {
    let args = match &a.arguments {
        None => None,
        Some(s) => {
            let v: Value = serde_json::from_str(s).context("ARGUMENTS is not valid JSON")?;
            if !v.is_object() {
                bail!("ARGUMENTS must be a JSON object, e.g. '{{\"device\": \"prefetch\"}}'");
            }
            Some(v)
        }
    };
    let stream = UnixStream::connect(&a.socket)
        .with_context(|| format!("cannot connect to {}", a.socket.display()))?;
    let mut c = Conn {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
    };
    let greeting = c.read()?;
    if greeting.get("QMP").is_none() {
        bail!("{} did not greet as a QMP server", a.socket.display());
    }
    let neg = c.execute("qmp_capabilities", None, 0)?;
    if let Some(e) = neg.get("error") {
        bail!("capabilities negotiation failed: {e}");
    }
    let mut out = std::io::stdout().lock();
    if a.events {
        // On stderr, so stdout stays one JSON object a line; also tells scripts it listens.
        super::warn_line(format_args!(
            "fvd ctl: printing the events of {} until interrupted",
            a.socket.display()
        ));
        loop {
            let v = c.read()?;
            if v.get("event").is_some() {
                writeln!(out, "{v}").map_err(super::OutputError)?;
                out.flush().map_err(super::OutputError)?;
            }
        }
    }
    let cmd = a.command.as_deref().unwrap_or_default();
    let reply = c.execute(cmd, args, 1)?;
    if let Some(e) = reply.get("error") {
        let class = e.get("class").and_then(Value::as_str).unwrap_or("Error");
        let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
        super::warn_line(format_args!("fvd ctl: {class}: {desc}"));
        return Ok(1);
    }
    let ret = reply.get("return").cloned().unwrap_or(Value::Null);
    writeln!(out, "{}", serde_json::to_string_pretty(&ret)?).map_err(super::OutputError)?;
    Ok(0)
}
