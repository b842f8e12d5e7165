//! The `egress` command line as a user meets it: `check`, `exec` (exit status, transient cgroup,
//! event formats, audit mode), refusals (not root, bad file, missing cgroup) and the events of
//! `egress run` for a cgroup and its descendants.
//!
//! Traffic goes to loopback only; cgroups are made by the harness or by `egress exec` itself.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use common::{egress_bin, privileged, run_limited, PolicyFile, Run, TestCgroup};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// `egress run [--log-format json] --config F`, made safe for tests on every build: the file
/// must pin the attach point to a test cgroup where the build knows `settings.attach`, and
/// enforcement is removed when the daemon stops.
fn egress_run(config: &PolicyFile, json: bool) -> Command {
    {
        let text = fs::read_to_string(&config.path).unwrap_or_default();
        // Files that cannot parse never reach the kernel; any other must name a test cgroup.
        let attach = text.lines().find_map(|l| l.strip_prefix("  attach: "));
        let parses = Command::new(egress_bin())
            .arg("check")
            .arg(&config.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            !parses || attach.is_some_and(|a| a.trim().starts_with("egress-test-")),
            "refusing to run a daemon that would attach outside the test's cgroups:\n{text}"
        );
    }
    let mut cmd = Command::new(egress_bin());
    cmd.arg("run");
    if json {
        cmd.args(["--log-format", "json"]);
    }
    cmd.args(["--on-exit", "detach"]);
    cmd.arg("--config").arg(&config.path);
    cmd
}

fn egress(args: &[&str]) -> Command {
    let mut cmd = Command::new(egress_bin());
    cmd.args(args);
    cmd
}

/// `egress exec --config F --policy P [--log-format json] -- sh -c SCRIPT`.
fn exec_sh(policy: &PolicyFile, name: &str, json: bool, script: &str) -> Run {
    let mut cmd = Command::new(egress_bin());
    cmd.arg("exec").arg("--config").arg(&policy.path).args(["--policy", name]);
    if json {
        cmd.args(["--log-format", "json"]);
    }
    cmd.args(["--", "sh", "-c", script]);
    run_limited(cmd, Duration::from_secs(30))
}

/// The same command, as an unprivileged user (nobody).
fn as_nobody(args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(egress_bin()).args(args);
    cmd
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Answers every connection with a minimal HTTP/1.0 200 response.
fn serve_http(listener: TcpListener) {
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || answer_http(stream));
        }
    });
}

fn answer_http(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut line = String::new();
    // Read the request head up to the empty line.
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let _ = stream.write_all(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n",
    );
}

/// HTTP servers on 127.0.0.1 and 127.0.0.2, both on the same free port.
fn http_pair() -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = first.local_addr().unwrap().port();
        if let Ok(second) = TcpListener::bind(("127.0.0.2", port)) {
            serve_http(first);
            serve_http(second);
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// The flow events among the lines of `text` (JSON objects with a `verdict`).
///
/// PRODUCT ISSUE (reported, not fixed here): `egress exec` writes its events to the stderr it
/// shares with the command, so an event can land in the middle of a line the command is still
/// writing (seen with `curl -v`: `*{"time":...}` followed by ` Failed to connect ...` on the next
/// line). Each event is one write ending in a newline, so it always ends a line, but it may not
/// start one. We therefore look for the object from the first `{"` of each line.
fn json_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| {
            let start = line.find("{\"")?;
            serde_json::from_str::<Value>(line[start..].trim()).ok()
        })
        .filter(|v| v.get("verdict").is_some())
        .collect()
}

/// The number after `PREFIX=` on a line of `stdout`.
fn printed_number(stdout: &str, prefix: &str) -> u32 {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}N line in stdout:\n{stdout}"))
}

fn transient_cgroup_dir(egress_pid: u32) -> PathBuf {
    common::cgroup2_mount().join(format!("egress-exec-{egress_pid}"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Strict RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) to seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') {
        return None;
    }
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(after) = rest.strip_prefix('.') {
        let n = after.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &after[..n]).parse().ok()?;
        rest = &after[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            sign * (digits_of(&rest[1..3])? * 3600 + digits_of(&rest[4..6])? * 60)
        }
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs as f64 + frac)
}

fn digits_of(s: &str) -> Option<i64> {
    if s.bytes().all(|c| c.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Every field of a flow event, exactly the documented ones, with the documented types; the
/// time is RFC 3339 and lies within [`from`, `to`] (with a little slack).
fn assert_event_shape(event: &Value, from: SystemTime, to: SystemTime) {
    let object = event.as_object().unwrap_or_else(|| panic!("event is not an object: {event}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected =
        vec!["time", "verdict", "policy", "rule", "cgroup", "pid", "comm", "uid", "protocol", "dst", "dport"];
    expected.sort_unstable();
    assert_eq!(keys, expected, "event fields: {event}");
    for key in ["time", "verdict", "policy", "rule", "cgroup", "comm", "protocol", "dst"] {
        assert!(event[key].is_string(), "{key} is not a string: {event}");
    }
    for key in ["pid", "uid", "dport"] {
        assert!(event[key].is_u64(), "{key} is not an unsigned number: {event}");
    }
    let time = event["time"].as_str().unwrap();
    let at = parse_rfc3339(time).unwrap_or_else(|| panic!("time {time:?} is not RFC 3339: {event}"));
    let (from, to) = (epoch_secs(from) - 2.0, epoch_secs(to) + 2.0);
    assert!(from <= at && at <= to, "event time {time} is not within the run ({from}..{to}): {event}");
}

/// Checks the stderr of a failed command: exit 2 and `FILE:LINE:COL: message` naming the spot.
fn assert_config_error(run: &Run, file: &Path, line: usize, column: usize, fragment: &str) {
    assert_eq!(run.code(), Some(2), "{}", run.describe());
    let position = format!("{}:{line}:{column}: ", file.display());
    let diagnostic = run
        .stderr
        .lines()
        .find(|l| l.contains(&position))
        .unwrap_or_else(|| panic!("no `{position}` diagnostic:\n{}", run.describe()));
    // The position starts the message (after at most the program's name).
    let message = diagnostic.strip_prefix("egress: ").unwrap_or(diagnostic);
    assert!(message.starts_with(&position), "diagnostic does not start with the position: {diagnostic:?}");
    assert!(diagnostic.contains(fragment), "diagnostic {diagnostic:?} does not say {fragment:?}");
}

// ---------------------------------------------------------------------------------------------
// egress check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_file_with_one_summary_line_per_policy() {
    let file = PolicyFile::exact(
        "\
# two policies
policies:
  - name: web
    cgroup: system.slice/web.service
    default: deny
    mode: enforce
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [80, 8000-8080]
      - allow: ::1
        protocol: tcp
        ports: 443
      - allow: 10.0.0.0/8
        protocol: icmp
      - deny: 127.0.0.0/8
  - name: batch
    cgroup: /batch/../batch-jobs
    default: allow
    mode: audit
    rules:
      - deny: fd00::/8
",
    );
    // `/batch/../batch-jobs` is refused (leading slash); use a clean second file for success.
    let bad = run_limited(
        {
            let mut c = egress(&["check"]);
            c.arg(&file.path);
            c
        },
        Duration::from_secs(10),
    );
    assert_config_error(&bad, &file.path, 18, 13, "must be relative");

    file.rewrite(
        "\
# two policies
policies:
  - name: web
    cgroup: system.slice/web.service
    default: deny
    mode: enforce
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [80, 8000-8080]
      - allow: ::1
        protocol: tcp
        ports: 443
      - allow: 10.0.0.0/8
        protocol: icmp
      - deny: 127.0.0.0/8
  - name: batch
    cgroup: batch-jobs/
    default: allow
    mode: audit
    rules:
      - deny: fd00::/8
",
    );
    let mut cmd = egress(&["check"]);
    cmd.arg(&file.path);
    let run = run_limited(cmd, Duration::from_secs(10));
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "web: cgroup system.slice/web.service, default deny, mode enforce, 4 rules (3 IPv4, 1 IPv6)",
            "batch: cgroup batch-jobs, default allow, mode audit, 1 rules (0 IPv4, 1 IPv6)",
        ],
        "{}",
        run.describe()
    );
}

#[test]
fn check_does_not_need_root() {
    if !privileged() || !have("setpriv") {
        // Without root we are already unprivileged: the other check tests cover it.
        return;
    }
    let file = PolicyFile::exact("policies:\n  - name: p\n    cgroup: x\n    rules:\n      - deny: 10.0.0.0/8\n");
    let dir = file.path.parent().unwrap();
    // Let nobody read the file.
    Command::new("chmod").arg("755").arg(dir).status().unwrap();
    Command::new("chmod").arg("644").arg(&file.path).status().unwrap();
    let run = run_limited(as_nobody(&["check", file.path.to_str().unwrap()]), Duration::from_secs(10));
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(run.stdout.trim(), "p: cgroup x, default deny, mode enforce, 1 rules (1 IPv4, 0 IPv6)");
}

/// A valid policy with one line swapped in; errors are expected at `line` (1-based).
const CHECK_BASE: &str = "\
# comment, then a blank line

policies:
  - name: first
    cgroup: egress-check-first
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [80, 8000-8080]
  - name: second
    cgroup: egress-check-second
    default: allow
    rules:
      - deny: 10.0.0.0/8
        protocol: udp
        ports: 53
";

fn check_text(text: &str) -> (PolicyFile, Run) {
    let file = PolicyFile::exact(text);
    let mut cmd = egress(&["check"]);
    cmd.arg(&file.path);
    let run = run_limited(cmd, Duration::from_secs(10));
    (file, run)
}

/// Replaces line `n` (1-based) of `base`.
fn with_line(base: &str, n: usize, line: &str) -> String {
    let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
    lines[n - 1] = line.to_owned();
    lines.join("\n") + "\n"
}

/// Each case replaces a line of CHECK_BASE: (line, new text, expected column, message fragment).
fn assert_check_errors(cases: &[(usize, &str, usize, &str)]) {
    for &(line, text, column, fragment) in cases {
        let (file, run) = check_text(&with_line(CHECK_BASE, line, text));
        assert_config_error(&run, &file.path, line, column, fragment);
        assert!(run.stdout.is_empty(), "no summary for a bad file: {}", run.describe());
    }
}

#[test]
fn check_base_file_is_valid() {
    let (_file, run) = check_text(CHECK_BASE);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.describe());
}

#[test]
fn check_reports_a_bad_cidr_with_line_and_column() {
    // (replaced line, new text, column, message fragment)
    let cases = [
        (14, "      - deny: 10.0.0.0/33", 15, "`10.0.0.0/33` is not an IPv4 or IPv6 address or CIDR"),
        (14, "      - deny: 300.1.2.3", 15, "`300.1.2.3` is not an IPv4 or IPv6 address or CIDR"),
        (7, "      - allow: not/an-address", 16, "`not/an-address` is not"),
        (7, "      - allow: \"not an address\"", 16, "has characters a host name cannot have"),
        (7, "      - allow: fd00::/129", 16, "`fd00::/129` is not"),
        (7, "      - allow: \"10.0.0.0/8x\"", 16, "`10.0.0.0/8x` is not"),
    ];
    assert_check_errors(&cases);
}

#[test]
fn check_reports_host_bits_with_line_and_column() {
    let cases = [
        (14, "      - deny: 10.0.0.1/8", 15, "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
        (7, "      - allow: fd00::1/64", 16, "fd00::1/64 has host bits set; did you mean fd00::/64?"),
        (7, "      - allow:   192.168.1.1/24", 18, "did you mean 192.168.1.0/24?"),
    ];
    assert_check_errors(&cases);
}

#[test]
fn check_reports_bad_and_reversed_port_ranges_with_line_and_column() {
    let cases = [
        (9, "        ports: [80, 9000-8000]", 21, "port range 9000-8000 is reversed; did you mean 8000-9000?"),
        (16, "        ports: 9000-8000", 16, "port range 9000-8000 is reversed"),
        (16, "        ports: 80-abc", 16, "`80-abc` is not a port or a port range"),
        (9, "        ports: [80, 8000-70000]", 21, "port 70000 in `8000-70000` is out of range"),
        (16, "        ports: 65536", 16, "port 65536 in `65536` is out of range"),
    ];
    assert_check_errors(&cases);
}

#[test]
fn check_reports_port_zero_with_line_and_column() {
    let cases = [
        (16, "        ports: 0", 16, "port 0 in `0` is not a port; ports are 1-65535"),
        (9, "        ports: [80, 0]", 21, "port 0 in `0` is not a port"),
        (9, "        ports: [0-80]", 17, "port 0 in `0-80` is not a port"),
    ];
    assert_check_errors(&cases);
}

#[test]
fn check_reports_unknown_keys_with_line_and_column() {
    // Top level of the file.
    let (file, run) = check_text(&(CHECK_BASE.to_owned() + "verbose: true\n"));
    assert_config_error(&run, &file.path, 17, 1, "unknown field `verbose`");
    let (file, run) = check_text(&with_line(CHECK_BASE, 3, "polices:"));
    assert_config_error(&run, &file.path, 3, 1, "unknown field `polices`");
    // In a policy.
    let (file, run) = check_text(&with_line(CHECK_BASE, 12, "    defualt: allow"));
    assert_config_error(&run, &file.path, 12, 5, "unknown field `defualt`");
    // In a rule: after the CIDR, and as the rule's first key.
    let (file, run) = check_text(&with_line(CHECK_BASE, 15, "        proto: udp"));
    assert_config_error(&run, &file.path, 15, 9, "unknown field `proto`");
    let (file, run) = check_text(&with_line(CHECK_BASE, 14, "      - port: 53"));
    assert_config_error(&run, &file.path, 14, 9, "unknown field `port`");
}

#[test]
fn check_reports_yaml_syntax_errors_with_line_and_column() {
    // A flow sequence closed with the wrong bracket: the error is at the `}`.
    let (file, run) = check_text(&with_line(CHECK_BASE, 9, "        ports: [80, 8000-8080}"));
    assert_config_error(&run, &file.path, 9, 30, "did not find expected ',' or ']'");
    // A key indented one column short of its siblings.
    let (file, run) = check_text(&with_line(CHECK_BASE, 12, "   default: allow"));
    assert_config_error(&run, &file.path, 12, 4, "did not find expected");
}

#[test]
fn check_of_a_missing_file_fails_with_status_2() {
    let file = PolicyFile::exact("");
    let missing = file.path.with_file_name("no-such-file.yaml");
    let mut cmd = egress(&["check"]);
    cmd.arg(&missing);
    let run = run_limited(cmd, Duration::from_secs(10));
    assert_eq!(run.code(), Some(2), "{}", run.describe());
    assert!(run.stderr.contains(missing.to_str().unwrap()), "{}", run.describe());
}

// ---------------------------------------------------------------------------------------------
// egress exec: the acceptance scenario
// ---------------------------------------------------------------------------------------------

fn web_policy(name: &str, mode: &str, port: u16) -> String {
    format!(
        "\
policies:
  - name: {name}
    cgroup: ignored-by-exec
    default: deny
    mode: {mode}
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [{port}]
      - deny: 127.0.0.0/8
"
    )
}

#[test]
fn exec_blocks_a_denied_destination_at_once_with_one_json_event() {
    if !privileged() {
        return;
    }
    let port = http_pair();
    let name = common::unique("acceptance");
    let policy = PolicyFile::exact(&web_policy(&name, "enforce", port));
    let from = SystemTime::now();
    let run =
        exec_sh(&policy, &name, true, &format!("echo PID=$$; exec curl -v -sS --max-time 10 http://127.0.0.2:{port}/"));
    let to = SystemTime::now();
    let pid = printed_number(&run.stdout, "PID=");

    // curl's own status comes back: 7, could not connect.
    assert_eq!(run.code(), Some(7), "{}", run.describe());
    // Refused at once by connect(), not timed out.
    assert!(run.stderr.contains("Operation not permitted"), "{}", run.describe());
    let after_ms: Vec<u64> = run
        .stderr
        .lines()
        .filter_map(|l| l.split_once(" after ")?.1.split_once(" ms")?.0.trim().parse().ok())
        .collect();
    assert!(!after_ms.is_empty(), "curl said nothing about how long it tried:\n{}", run.describe());
    assert!(after_ms.iter().all(|&ms| ms < 1000), "curl took too long: {after_ms:?}\n{}", run.describe());
    assert!(run.elapsed < Duration::from_secs(3), "exec took {:?}\n{}", run.elapsed, run.describe());

    // Exactly one event, for that connection.
    let events = json_events(&run.stderr);
    assert_eq!(events.len(), 1, "expected one event:\n{}", run.describe());
    let event = &events[0];
    assert_event_shape(event, from, to);
    assert_eq!(event["verdict"], "blocked", "{event}");
    assert_eq!(event["comm"], "curl", "{event}");
    assert_eq!(event["pid"], pid, "{event}");
    assert_eq!(event["dst"], "127.0.0.2", "{event}");
    assert_eq!(event["dport"], port, "{event}");
    assert_eq!(event["protocol"], "tcp", "{event}");
    assert_eq!(event["rule"], "deny 127.0.0.0/8", "{event}");
    assert_eq!(event["policy"], name.as_str(), "{event}");
    assert_eq!(event["uid"], 0, "{event}");
    let cgroup = event["cgroup"].as_str().unwrap();
    assert!(cgroup.starts_with("egress-exec-"), "{event}");
    assert_eq!(cgroup, format!("egress-exec-{}", run.pid), "{event}");
    // The policy's own `cgroup:` is ignored by exec.
    assert!(!common::cgroup2_mount().join("ignored-by-exec").exists());
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");
}

#[test]
fn exec_allows_an_allowed_destination_with_an_allowed_event() {
    if !privileged() {
        return;
    }
    let port = http_pair();
    let name = common::unique("allowed");
    let policy = PolicyFile::exact(&web_policy(&name, "enforce", port));
    let from = SystemTime::now();
    let run = exec_sh(
        &policy,
        &name,
        true,
        &format!(
            "echo PID=$$; exec curl -sS --max-time 10 -o /dev/null -w 'HTTP=%{{http_code}}\\n' http://127.0.0.1:{port}/"
        ),
    );
    let to = SystemTime::now();
    let pid = printed_number(&run.stdout, "PID=");
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(printed_number(&run.stdout, "HTTP="), 200, "{}", run.describe());

    let events = json_events(&run.stderr);
    assert_eq!(events.len(), 1, "expected one event:\n{}", run.describe());
    let event = &events[0];
    assert_event_shape(event, from, to);
    assert_eq!(event["verdict"], "allowed", "{event}");
    assert_eq!(event["rule"], format!("allow 127.0.0.1/32 tcp ports {port}"), "{event}");
    assert_eq!(event["comm"], "curl", "{event}");
    assert_eq!(event["pid"], pid, "{event}");
    assert_eq!(event["dst"], "127.0.0.1", "{event}");
    assert_eq!(event["dport"], port, "{event}");
    assert_eq!(event["protocol"], "tcp", "{event}");
    assert_eq!(event["policy"], name.as_str(), "{event}");
    assert_eq!(event["uid"], 0, "{event}");
    assert_eq!(event["cgroup"], format!("egress-exec-{}", run.pid), "{event}");
}

#[test]
fn exec_text_output_names_verdict_destination_process_and_rule() {
    if !privileged() {
        return;
    }
    let port = http_pair();
    let name = common::unique("text");
    let policy = PolicyFile::exact(&web_policy(&name, "enforce", port));
    let from = SystemTime::now();
    let run =
        exec_sh(&policy, &name, false, &format!("echo PID=$$; exec curl -sS --max-time 10 http://127.0.0.2:{port}/"));
    let to = SystemTime::now();
    let pid = printed_number(&run.stdout, "PID=");
    assert_eq!(run.code(), Some(7), "{}", run.describe());

    let blocked: Vec<&str> = run.stderr.lines().filter(|l| l.contains("BLOCKED")).collect();
    assert_eq!(blocked.len(), 1, "expected one BLOCKED line:\n{}", run.describe());
    let line = blocked[0];
    for part in [
        format!(" 127.0.0.2:{port} "),
        format!(" curl[{pid}] "),
        " tcp ".to_owned(),
        " uid=0 ".to_owned(),
        format!(" cgroup=egress-exec-{} ", run.pid),
        format!(" policy={name} "),
    ] {
        assert!(line.contains(&part), "{line:?} lacks {part:?}");
    }
    assert!(line.ends_with("rule=\"deny 127.0.0.0/8\""), "{line:?}");
    // The event starts with the RFC 3339 time (24 characters with milliseconds), then the
    // verdict. (It may follow a partial line of curl's own stderr; see `json_events`.)
    let verdict_at = line.find(" BLOCKED ").unwrap_or_else(|| panic!("{line:?}"));
    let time = &line[verdict_at.saturating_sub(24)..verdict_at];
    let at = parse_rfc3339(time).unwrap_or_else(|| panic!("{time:?} is not RFC 3339 in {line:?}"));
    assert!(epoch_secs(from) - 2.0 <= at && at <= epoch_secs(to) + 2.0, "{line:?}");
    // No JSON in the text format.
    assert!(json_events(&run.stderr).is_empty(), "{}", run.describe());
}

// ---------------------------------------------------------------------------------------------
// egress exec: exit status and the transient cgroup
// ---------------------------------------------------------------------------------------------

fn any_policy(name: &str) -> PolicyFile {
    PolicyFile::exact(&format!(
        "policies:\n  - name: {name}\n    cgroup: ignored-by-exec\n    default: deny\n    rules:\n      - deny: 127.0.0.0/8\n"
    ))
}

#[test]
fn exec_passes_the_exit_status_through_and_removes_its_cgroup() {
    if !privileged() {
        return;
    }
    let name = common::unique("status");
    let policy = any_policy(&name);
    let run = exec_sh(&policy, &name, false, "cat /proc/$$/cgroup; exit 3");
    assert_eq!(run.code(), Some(3), "{}", run.describe());
    // The command ran in the transient cgroup, named after the egress process.
    let cgroup = format!("0::/egress-exec-{}", run.pid);
    assert!(run.stdout.lines().any(|l| l.trim() == cgroup), "expected {cgroup:?} in:\n{}", run.describe());
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");

    for (script, code) in [("exit 0", 0), ("exit 1", 1), ("exit 255", 255), ("true", 0)] {
        let run = exec_sh(&policy, &name, false, script);
        assert_eq!(run.code(), Some(code), "{script}: {}", run.describe());
        assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind after {script}");
    }
}

#[test]
fn exec_reports_death_by_signal_as_128_plus_signal() {
    if !privileged() {
        return;
    }
    let name = common::unique("signal");
    let policy = any_policy(&name);
    let run = exec_sh(&policy, &name, false, "kill -KILL $$");
    assert_eq!(run.code(), Some(128 + 9), "{}", run.describe());
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");
}

#[test]
fn exec_kills_leftover_processes_and_removes_its_cgroup() {
    if !privileged() {
        return;
    }
    let name = common::unique("leftover");
    let policy = any_policy(&name);
    // A background process that outlives the command and holds stdout open.
    let run = exec_sh(&policy, &name, false, "sleep 60 & echo BG=$!; exit 4");
    assert_eq!(run.code(), Some(4), "{}", run.describe());
    assert!(run.elapsed < Duration::from_secs(20), "{}", run.describe());
    let bg = printed_number(&run.stdout, "BG=");
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");
    // The leftover is gone (or at most a zombie on its way out).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{bg}/stat")).ok();
        let alive = state.as_deref().is_some_and(|s| {
            s.rsplit_once(')').map(|(_, r)| r.trim_start()).is_some_and(|r| !r.starts_with('Z'))
                && s.contains("(sleep)")
        });
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "leftover sleep {bg} still running");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_of_a_missing_program_fails_and_removes_its_cgroup() {
    if !privileged() {
        return;
    }
    let name = common::unique("missing");
    let policy = any_policy(&name);
    let mut cmd = egress(&["exec", "--config", policy.path.to_str().unwrap(), "--policy", &name, "--"]);
    cmd.arg("/nonexistent/egress-test-program");
    let run = run_limited(cmd, Duration::from_secs(30));
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stderr.contains("/nonexistent/egress-test-program"), "{}", run.describe());
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");
}

#[test]
fn exec_with_an_unknown_policy_name_fails_naming_it() {
    if !privileged() {
        return;
    }
    let name = common::unique("known");
    let policy = any_policy(&name);
    let marker = policy.path.with_file_name("ran");
    let mut cmd = egress(&["exec", "--config", policy.path.to_str().unwrap(), "--policy", "no-such-policy", "--"]);
    cmd.arg("touch").arg(&marker);
    let run = run_limited(cmd, Duration::from_secs(30));
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stderr.contains("no-such-policy"), "{}", run.describe());
    assert!(!marker.exists(), "the command ran without its policy");
    assert!(!transient_cgroup_dir(run.pid).exists(), "transient cgroup left behind");
}

// ---------------------------------------------------------------------------------------------
// audit mode
// ---------------------------------------------------------------------------------------------

#[test]
fn exec_in_audit_mode_lets_denied_flows_through_with_audit_events() {
    if !privileged() {
        return;
    }
    let port = http_pair();
    let name = common::unique("audit");
    let bare = common::unique("audit-default");
    let policy = PolicyFile::exact(&format!(
        "{}  - name: {bare}\n    cgroup: ignored-by-exec-2\n    default: deny\n    mode: audit\n",
        web_policy(&name, "audit", port)
    ));
    let curl = |host: &str| {
        format!(
            "sh -c 'echo PID_{}=$$; exec curl -sS --max-time 10 -o /dev/null -w \"HTTP_{}=%{{http_code}}\\n\" http://{host}:{port}/'",
            host.replace('.', "_"),
            host.replace('.', "_")
        )
    };

    // A rule denies 127.0.0.2, the allow rule lets 127.0.0.1 through.
    let from = SystemTime::now();
    let run = exec_sh(&policy, &name, true, &format!("{} && {}", curl("127.0.0.2"), curl("127.0.0.1")));
    let to = SystemTime::now();
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(printed_number(&run.stdout, "HTTP_127_0_0_2="), 200, "{}", run.describe());
    assert_eq!(printed_number(&run.stdout, "HTTP_127_0_0_1="), 200, "{}", run.describe());
    let events = json_events(&run.stderr);
    assert_eq!(events.len(), 2, "expected two events:\n{}", run.describe());
    for e in &events {
        assert_event_shape(e, from, to);
    }
    let denied = events.iter().find(|e| e["dst"] == "127.0.0.2").expect("event for 127.0.0.2");
    assert_eq!(denied["verdict"], "audit", "{denied}");
    assert_eq!(denied["rule"], "deny 127.0.0.0/8", "{denied}");
    assert_eq!(denied["pid"], printed_number(&run.stdout, "PID_127_0_0_2="), "{denied}");
    assert_eq!(denied["comm"], "curl", "{denied}");
    assert_eq!(denied["dport"], port, "{denied}");
    assert_eq!(denied["policy"], name.as_str(), "{denied}");
    let allowed = events.iter().find(|e| e["dst"] == "127.0.0.1").expect("event for 127.0.0.1");
    assert_eq!(allowed["verdict"], "allowed", "{allowed}");
    assert_eq!(allowed["rule"], format!("allow 127.0.0.1/32 tcp ports {port}"), "{allowed}");

    // No rule at all: the default denies, audit lets it through.
    let run = exec_sh(&policy, &bare, true, &curl("127.0.0.2"));
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(printed_number(&run.stdout, "HTTP_127_0_0_2="), 200, "{}", run.describe());
    let events = json_events(&run.stderr);
    assert_eq!(events.len(), 1, "expected one event:\n{}", run.describe());
    assert_eq!(events[0]["verdict"], "audit", "{}", events[0]);
    assert_eq!(events[0]["rule"], "default", "{}", events[0]);
    assert_eq!(events[0]["policy"], bare.as_str(), "{}", events[0]);
}

// ---------------------------------------------------------------------------------------------
// refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn client_exit_statuses_say_whether_the_daemon_is_missing_or_refuses_the_user() {
    let dir = std::env::temp_dir().join(format!("egress-cli-exit-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let missing = dir.join("missing.sock");
    for command in ["status", "reload", "logs"] {
        let run = run_limited(egress(&[command, "--socket", missing.to_str().unwrap()]), Duration::from_secs(10));
        assert_eq!(run.code(), Some(3), "{command}: {}", run.describe());
        assert!(run.stderr.contains("is it running?"), "{command}: {}", run.describe());
    }
    // A socket only root may open, as the daemon's is for everyone outside settings.control_group.
    let root_only = dir.join("root-only.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&root_only).expect("bind");
    fs::set_permissions(&root_only, fs::Permissions::from_mode(0o600)).expect("chmod socket");
    let run = run_limited(as_nobody(&["status", "--socket", root_only.to_str().unwrap()]), Duration::from_secs(10));
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(run.code(), Some(4), "{}", run.describe());
    assert!(run.stderr.contains("permission denied"), "{}", run.describe());
}

#[test]
fn run_and_exec_refuse_to_start_without_root() {
    if !privileged() || !have("setpriv") {
        return;
    }
    let name = common::unique("nonroot");
    let policy = any_policy(&name);
    let dir = policy.path.parent().unwrap();
    Command::new("chmod").arg("755").arg(dir).status().unwrap();
    Command::new("chmod").arg("644").arg(&policy.path).status().unwrap();
    let config = policy.path.to_str().unwrap();
    let marker = dir.join("ran");

    let run = run_limited(as_nobody(&["run", "--config", config]), Duration::from_secs(10));
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    assert!(run.elapsed < Duration::from_secs(2), "not at once: {}", run.describe());
    assert!(run.stderr.contains("must run as root"), "{}", run.describe());

    let run = run_limited(
        as_nobody(&["exec", "--config", config, "--policy", &name, "--", "touch", marker.to_str().unwrap()]),
        Duration::from_secs(10),
    );
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    assert!(run.elapsed < Duration::from_secs(2), "not at once: {}", run.describe());
    assert!(run.stderr.contains("must run as root"), "{}", run.describe());
    assert!(!marker.exists(), "exec ran the command without root");
}

#[test]
fn run_with_a_syntax_error_exits_2_before_touching_the_kernel() {
    if !privileged() {
        return;
    }
    let text = with_line(CHECK_BASE, 9, "        ports: [80, 8000-8080}");
    let policy = PolicyFile::exact(&text);
    let config = policy.path.to_str().unwrap();
    let run = run_limited(egress_run(&policy, false), Duration::from_secs(10));
    assert_config_error(&run, &policy.path, 9, 30, "did not find expected ',' or ']'");
    assert!(run.elapsed < Duration::from_secs(2), "{}", run.describe());

    // A semantic error as well.
    let bad = PolicyFile::exact(&with_line(CHECK_BASE, 14, "      - deny: 10.0.0.1/8"));
    let run = run_limited(egress_run(&bad, false), Duration::from_secs(10));
    assert_config_error(&run, &bad.path, 14, 15, "has host bits set");

    // The same for exec, which must not run the command either.
    let marker = bad.path.with_file_name("ran");
    let run = run_limited(
        egress(&[
            "exec",
            "--config",
            bad.path.to_str().unwrap(),
            "--policy",
            "first",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]),
        Duration::from_secs(10),
    );
    assert_config_error(&run, &bad.path, 14, 15, "has host bits set");
    assert!(!marker.exists(), "exec ran the command with a bad policy file");

    // Under strace: after the file is read, no bpf() call at all (the only ones are the
    // preflight's feature probes before it), and nothing is ever attached.
    if have("strace") {
        let trace = policy.path.with_file_name("strace.txt");
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-s", "4096", "-e", "trace=bpf,openat,open", "-o"])
            .arg(&trace)
            .arg(egress_bin())
            .args(["run", "--config", config]);
        let run = run_limited(cmd, Duration::from_secs(20));
        assert_eq!(run.code(), Some(2), "{}", run.describe());
        let trace = std::fs::read_to_string(&trace).expect("strace output");
        let opened = trace
            .lines()
            .position(|l| l.contains(&format!("\"{config}\"")))
            .unwrap_or_else(|| panic!("the policy file was never opened:\n{trace}"));
        let late: Vec<&str> = trace.lines().skip(opened).filter(|l| l.contains("bpf(")).collect();
        assert!(late.is_empty(), "bpf() after reading the bad file:\n{late:#?}");
        for forbidden in ["BPF_PROG_ATTACH", "BPF_LINK_CREATE", "BPF_OBJ_PIN"] {
            assert!(!trace.contains(forbidden), "{forbidden} with a bad file:\n{trace}");
        }
    }
}

#[test]
fn run_waits_for_a_missing_cgroup_and_enforces_it_once_it_appears() {
    if !privileged() {
        return;
    }
    let attach = TestCgroup::new("attach");
    let later = format!("{}/later", attach.relative);
    let name = common::unique("ghost");
    let port = common::tcp_server("127.0.0.2:0");
    let policy = PolicyFile::attached_at(
        Some(&attach.relative),
        &format!(
        "policies:\n  - name: {name}\n    cgroup: {later}\n    default: deny\n    rules:\n      - deny: 127.0.0.0/8\n"
    ),
    );
    let daemon = common::Daemon::spawn(egress_run(&policy, true));
    let log = daemon.log();
    let warning = log
        .lines()
        .find(|l| l.contains("no cgroup matches yet"))
        .unwrap_or_else(|| panic!("no warning about the missing cgroup:\n{log}"));
    assert!(warning.contains(&name), "the warning names the policy: {warning}");
    assert!(!common::cgroup2_mount().join(&later).exists(), "run must not create cgroups");
    let created = attach.child("later");
    let deadline = Instant::now() + Duration::from_secs(3);
    while common::tcp_connect_from(&created, "127.0.0.2", port) != "EPERM" {
        assert!(Instant::now() < deadline, "the new cgroup was never enforced:\n{}", daemon.log());
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// egress run: events name the cgroup, also for descendants
// ---------------------------------------------------------------------------------------------

/// Python: print the pid, then connect and print `ok` or the errno name.
const PY_PID_CONNECT: &str = r#"
import os, socket, sys, errno
print("PID=%d" % os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("RESULT=ok")
except socket.timeout:
    print("RESULT=TIMEOUT")
except OSError as e:
    print("RESULT=" + errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn connect_from(cgroup: &TestCgroup, host: &str, port: u16) -> (u32, String) {
    let out = cgroup.python(PY_PID_CONNECT, &[host, &port.to_string()]);
    let stdout = common::stdout_of(&out);
    let pid = printed_number(&stdout, "PID=");
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT="))
        .unwrap_or_else(|| panic!("no result: {stdout}\n{}", common::stderr_of(&out)))
        .to_owned();
    (pid, result)
}

#[test]
fn run_events_name_the_policy_cgroup_and_descendant_cgroups() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("cli-run");
    let leaf = parent.child("leaf");
    let port = common::tcp_server("127.0.0.1:0");
    let name = common::unique("run-events");
    let policy = PolicyFile::attached_at(
        Some(&parent.relative),
        &format!(
            "\
policies:
  - name: {name}
    cgroup: {}
    default: allow
    rules:
      - deny: 127.0.0.0/8
        protocol: tcp
",
            parent.relative
        ),
    );
    let daemon = common::Daemon::spawn(egress_run(&policy, true));

    let from = SystemTime::now();
    let (pid, result) = connect_from(&parent, "127.0.0.1", port);
    assert_eq!(result, "EPERM", "connect from the policy's cgroup");
    let event = daemon.wait_event(Duration::from_secs(5), |e| e["pid"] == pid);
    let to = SystemTime::now();
    assert_event_shape(&event, from, to);
    assert_eq!(event["verdict"], "blocked", "{event}");
    assert_eq!(event["cgroup"], parent.relative.as_str(), "{event}");
    assert_eq!(event["policy"], name.as_str(), "{event}");
    assert_eq!(event["rule"], "deny 127.0.0.0/8 tcp", "{event}");
    assert_eq!(event["dst"], "127.0.0.1", "{event}");
    assert_eq!(event["dport"], port, "{event}");
    assert_eq!(event["protocol"], "tcp", "{event}");
    assert_eq!(event["uid"], 0, "{event}");
    assert!(event["comm"].as_str().unwrap().starts_with("python"), "{event}");

    let (pid, result) = connect_from(&leaf, "127.0.0.1", port);
    assert_eq!(result, "EPERM", "connect from a child cgroup");
    let event = daemon.wait_event(Duration::from_secs(5), |e| e["pid"] == pid);
    assert_eq!(event["verdict"], "blocked", "{event}");
    assert_eq!(event["cgroup"], leaf.relative.as_str(), "{event}");
    assert_eq!(event["policy"], name.as_str(), "{event}");
    assert_eq!(event["rule"], "deny 127.0.0.0/8 tcp", "{event}");

    // One event per connect: exactly one for each of the two pids.
    thread::sleep(Duration::from_millis(200));
    let events = daemon.events();
    for e in &events {
        assert!(e.get("verdict").is_some(), "non-event on stdout: {e}");
    }
    assert_eq!(events.iter().filter(|e| e["pid"] == pid).count(), 1, "{events:#?}");
    assert_eq!(events.len(), 2, "{events:#?}");
    let status = daemon.stop();
    assert!(status.success(), "egress run exited with {status:?}");
}

#[test]
fn rfc3339_parser_self_check() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(parse_rfc3339("2000-02-29T00:00:00.000Z"), Some(951_782_400.0));
    assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0.0));
    assert_eq!(parse_rfc3339("2026-11-23 10:01:02Z"), None);
    assert_eq!(parse_rfc3339("2026-11-23T10:01:02"), None);
    assert_eq!(parse_rfc3339("2026-13-23T10:01:02Z"), None);
}
