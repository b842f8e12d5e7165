//! Names a process chooses for itself reach egress's output escaped: a process in a covered
//! cgroup that renames itself (`/proc/self/comm`) to text with a newline and a terminal escape
//! cannot forge or erase a line of the daemon's log, of `egress logs`, or of its JSON.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// A newline, then "erase the line" and a fake verdict: 13 bytes, within comm's 15.
const HOSTILE: &str = "x\n\x1b[2KBLOCKED";

/// How the text output writes [`HOSTILE`].
const ESCAPED: &str = "x\\n\\x1b[2KBLOCKED";

/// Renames itself to argv[1], prints its pid, then connects to argv[2]:argv[3].
const PY_RENAME_AND_CONNECT: &str = r#"
import os, socket, sys, errno
with open('/proc/self/comm', 'w') as f:
    f.write(sys.argv[1])
print(os.getpid(), flush=True)
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[2], int(sys.argv[3]))); print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn policy(cgroup: &TestCgroup) -> PolicyFile {
    PolicyFile::attached_at(
        Some(&cgroup.relative),
        &format!(
            "policies:\n  - name: names\n    cgroup: {}\n    default: allow\n    rules:\n      - deny: 127.0.0.2\n",
            cgroup.relative
        ),
    )
}

/// Runs the renaming client in `cgroup` against a denied loopback address: its pid.
fn hostile_connect(cgroup: &TestCgroup, port: u16) -> u32 {
    let output = cgroup.python(PY_RENAME_AND_CONNECT, &[HOSTILE, "127.0.0.2", &port.to_string()]);
    let out = stdout_of(&output);
    let mut lines = out.lines();
    let pid = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| {
        panic!("no pid from the client: {out}\n{}", stderr_of(&output));
    });
    assert_eq!(lines.next(), Some("EPERM"), "the connect must be refused: {out}\n{}", stderr_of(&output));
    pid
}

/// Asserts that exactly one of `lines` tells of the event of `pid` to `destination`, with the
/// name escaped, and that no line carries a raw escape character.
fn assert_one_escaped_line(lines: &[String], pid: u32, destination: &str) {
    let of_pid: Vec<&String> = lines.iter().filter(|l| l.contains(&format!("[{pid}]"))).collect();
    let of_destination: Vec<&String> = lines.iter().filter(|l| l.contains(destination)).collect();
    assert_eq!(of_pid.len(), 1, "one line for the event: {lines:#?}");
    assert_eq!(of_pid, of_destination, "the event is one line: {lines:#?}");
    let line = of_pid[0];
    assert!(line.contains(" BLOCKED "), "{line:?}");
    assert!(line.contains(&format!(" {destination} {ESCAPED}[{pid}] uid=")), "{line:?}");
    assert!(lines.iter().all(|l| !l.contains('\x1b') && !l.contains('\r')), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.starts_with("BLOCKED") || l.starts_with("\x1b")), "{lines:#?}");
}

fn egress_logs(file: &PolicyFile, json: bool) -> Vec<String> {
    let mut cmd = Command::new(egress_bin());
    cmd.arg("logs").arg("--socket").arg(&file.socket);
    if json {
        cmd.arg("--json");
    }
    let output = cmd.output().expect("run egress logs");
    assert!(output.status.success(), "egress logs: {}", stderr_of(&output));
    String::from_utf8(output.stdout).expect("egress logs writes UTF-8").lines().map(str::to_owned).collect()
}

#[test]
fn a_renamed_process_cannot_forge_text_log_lines() {
    if !privileged() {
        return;
    }
    let cgroup = TestCgroup::new("names-text");
    let file = policy(&cgroup);
    let port = tcp_server("127.0.0.2:0");
    let mut command = Command::new(egress_bin());
    command.args(["run", "--log-format", "text", "--config"]).arg(&file.path);
    let daemon = Daemon::spawn(command);

    let pid = hostile_connect(&cgroup, port);
    let destination = format!("127.0.0.2:{port}");
    daemon.wait_event(Duration::from_secs(5), |e| e.as_str().is_some_and(|l| l.contains(&destination)));
    // Give a split line's second half time to arrive, were there one.
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = daemon.events().iter().filter_map(|e| e.as_str().map(str::to_owned)).collect();
    assert_one_escaped_line(&lines, pid, &destination);

    // `egress logs` prints the kept event the same way.
    assert_one_escaped_line(&egress_logs(&file, false), pid, &destination);
    // `egress logs --json`: one object per line, the name intact after parsing.
    let json = egress_logs(&file, true);
    let events: Vec<Value> = json.iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let event = events.iter().find(|e| e["pid"] == pid).unwrap_or_else(|| panic!("no event: {json:#?}"));
    assert_eq!(event["comm"], HOSTILE, "{event}");
    assert!(json.iter().all(|l| !l.contains('\x1b')), "{json:#?}");
}

#[test]
fn a_renamed_process_keeps_its_name_in_one_json_line() {
    if !privileged() {
        return;
    }
    let cgroup = TestCgroup::new("names-json");
    let file = policy(&cgroup);
    let port = tcp_server("127.0.0.2:0");
    let daemon = Daemon::start(&file);

    let pid = hostile_connect(&cgroup, port);
    let event = daemon.wait_event(Duration::from_secs(5), |e| e["pid"] == pid);
    assert_eq!(event["comm"], HOSTILE, "{event}");
    assert_eq!(event["verdict"], "blocked", "{event}");
    assert_eq!(event["dport"], port, "{event}");
    // Every stdout line parsed as JSON: the name split nothing.
    std::thread::sleep(Duration::from_millis(300));
    let stray: Vec<Value> = daemon.events().into_iter().filter(Value::is_string).collect();
    assert!(stray.is_empty(), "lines that are not JSON: {stray:#?}");
}
