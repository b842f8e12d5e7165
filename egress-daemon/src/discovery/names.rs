//! Container names and id prefixes -> full container ids.
//!
//! Names only the runtimes know, so they come from their CLIs (`docker ps`, `podman ps`) when
//! those are installed; ids also come from the cgroup paths discovery has seen, so an id prefix
//! resolves with no CLI at all. Best effort: a missing, hung or failing CLI just contributes
//! nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    ffi::OsStr,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use super::runtime::{is_container_id, Runtime};

/// How long one CLI may take before it is killed and ignored.
const CLI_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest id prefix accepted, as `docker` itself requires none but a shorter one is
/// ambiguous on any real host.
pub const MIN_PREFIX: usize = 4;

/// The CLIs asked, in order. `--all` so a created-but-not-started container is already known by
/// name when its cgroup appears.
const CLIS: &[(Runtime, &str)] = &[(Runtime::Docker, "docker"), (Runtime::Podman, "podman")];
const PS_ARGS: &[&str] = &["ps", "--all", "--no-trunc", "--format", "{{.ID}} {{.Names}}"];

/// Known container names and ids.
#[derive(Clone, Debug, Default)]
pub struct ContainerNames {
    /// name -> ids (two runtimes may both have a container of one name).
    by_name: BTreeMap<String, BTreeSet<String>>,
    /// Ids the CLIs listed at the last refresh.
    cli_ids: BTreeSet<String>,
    /// Ids seen in cgroup paths.
    seen_ids: BTreeSet<String>,
}

impl ContainerNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every installed runtime CLI for its containers, replacing what the CLIs said before.
    /// Blocks for up to 2 s per CLI: call it from `spawn_blocking` in async code.
    pub fn refresh(&mut self) {
        let mut listings = Vec::new();
        for (runtime, program) in CLIS {
            let Some(binary) = find_on_path(program) else { continue };
            match run_with_timeout(&binary, PS_ARGS, CLI_TIMEOUT) {
                Ok(output) => listings.push((*runtime, output)),
                Err(why) => tracing::debug!("{program} ps: {why}; its container names are unknown"),
            }
        }
        self.set_cli_listings(listings.iter().map(|(runtime, text)| (*runtime, text.as_str())));
    }

    /// Replaces the CLI-derived names and ids with the given `ps` outputs (one per runtime).
    pub fn set_cli_listings<'a>(&mut self, listings: impl IntoIterator<Item = (Runtime, &'a str)>) {
        self.by_name.clear();
        self.cli_ids.clear();
        for (_runtime, text) in listings {
            for (id, names) in parse_ps(text) {
                for name in names {
                    self.by_name.entry(name).or_default().insert(id.clone());
                }
                self.cli_ids.insert(id);
            }
        }
    }

    /// Adds container ids seen in cgroup paths; anything but a full 64-hex id is ignored.
    pub fn note_ids(&mut self, ids: impl IntoIterator<Item = String>) {
        self.seen_ids.extend(ids.into_iter().filter(|id| is_container_id(id)));
    }

    /// Forgets an id noted from a cgroup that has gone.
    pub fn forget_id(&mut self, id: &str) {
        self.seen_ids.remove(id);
    }

    /// The ids a `container:` selector means: those of the container with exactly this name, else
    /// every known id starting with it when it is a hex prefix of at least [`MIN_PREFIX`] digits.
    /// Sorted; more than one id means the name or prefix is ambiguous.
    pub fn ids_for(&self, name_or_prefix: &str) -> Vec<String> {
        if let Some(ids) = self.by_name.get(name_or_prefix) {
            return ids.iter().cloned().collect();
        }
        let prefix = name_or_prefix.to_ascii_lowercase();
        if prefix.len() < MIN_PREFIX || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Vec::new();
        }
        let matching = |set: &BTreeSet<String>| -> Vec<String> {
            set.range(prefix.clone()..).take_while(|id| id.starts_with(&prefix)).cloned().collect()
        };
        let mut ids: BTreeSet<String> = matching(&self.cli_ids).into_iter().collect();
        ids.extend(matching(&self.seen_ids));
        ids.into_iter().collect()
    }
}

/// `<id> <names>` lines from `{{.ID}} {{.Names}}`: docker joins several names (legacy links)
/// with commas. Lines without a full id are skipped, so a CLI printing warnings costs nothing.
fn parse_ps(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (id, names) = line.trim().split_once(char::is_whitespace)?;
            let id = id.to_ascii_lowercase();
            if !is_container_id(&id) {
                return None;
            }
            let names: Vec<String> = names
                .trim()
                .split(',')
                .map(|name| name.trim().trim_start_matches('/'))
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect();
            Some((id, names))
        })
        .collect()
}

/// The executable `program` in `$PATH`, as a shell finds it.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why a runtime's CLI gave no listing.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot start: {0}")]
    Start(#[source] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("wait: {0}")]
    Wait(#[source] std::io::Error),
    #[error("exited with {0}")]
    Exit(std::process::ExitStatus),
    #[error("reading its output: {0}")]
    Read(#[source] std::io::Error),
    #[error("its output never ended")]
    Unended,
}

/// Runs a command and returns its stdout if it exits 0 within `timeout`; kills it otherwise.
/// Stdout is drained on a thread so a long listing cannot fill the pipe and stall the child.
fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> Result<String, CliError> {
    let mut child = Command::new(program)
        .args(args.iter().map(OsStr::new))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(CliError::Start)?;
    let (tx, rx) = mpsc::channel();
    if let Some(mut stdout) = child.stdout.take() {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = tx.send(stdout.read_to_string(&mut text).map(|_| text));
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CliError::Timeout(timeout));
            }
            Err(e) => return Err(CliError::Wait(e)),
        }
    };
    if !status.success() {
        return Err(CliError::Exit(status));
    }
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(CliError::Read(e)),
        Err(_) => Err(CliError::Unended),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "3f2a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b";
    const DB: &str = "3f2a9c77aaaabbbbccccddddeeeeffff00001111222233334444555566667777";
    const POD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn names() -> ContainerNames {
        let docker = format!("{WEB} web\n{DB} db,app/db\nWARNING: something the CLI felt like saying\n\n");
        let podman = format!("{POD} pg\n{WEB} web\n");
        let mut names = ContainerNames::new();
        names.set_cli_listings([(Runtime::Docker, docker.as_str()), (Runtime::Podman, podman.as_str())]);
        names
    }

    #[test]
    fn parses_ids_and_comma_separated_names() {
        let parsed = parse_ps(&format!("{WEB} web\n{DB} db,app/db\nnot-an-id name\n{POD}\n"));
        assert_eq!(
            parsed,
            vec![
                (WEB.to_string(), vec!["web".to_string()]),
                (DB.to_string(), vec!["db".to_string(), "app/db".to_string()]),
            ]
        );
        // an id with no name at all (whitespace missing) is skipped rather than guessed at
    }

    #[test]
    fn exact_names_win() {
        let names = names();
        assert_eq!(names.ids_for("db"), vec![DB.to_string()]);
        assert_eq!(names.ids_for("app/db"), vec![DB.to_string()]);
        assert_eq!(names.ids_for("pg"), vec![POD.to_string()]);
        // both runtimes know a "web", with the same id here: one id, not two
        assert_eq!(names.ids_for("web"), vec![WEB.to_string()]);
    }

    #[test]
    fn a_name_that_looks_like_hex_is_still_a_name_first() {
        let mut names = ContainerNames::new();
        names.set_cli_listings([(Runtime::Docker, format!("{POD} 3f2a\n").as_str())]);
        names.note_ids([WEB.to_string()]);
        assert_eq!(names.ids_for("3f2a"), vec![POD.to_string()]);
        assert_eq!(names.ids_for("3f2a9"), vec![WEB.to_string()]);
    }

    #[test]
    fn prefixes_match_ids_from_clis_and_from_cgroups() {
        let mut names = names();
        assert_eq!(names.ids_for("3f2a9c0d"), vec![WEB.to_string()]);
        assert_eq!(names.ids_for("3F2A9C0D"), vec![WEB.to_string()]);
        assert_eq!(names.ids_for("3f2a9c"), vec![WEB.to_string(), DB.to_string()]);
        assert_eq!(names.ids_for(WEB), vec![WEB.to_string()]);

        let seen = "3f2a9cffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
        names.note_ids([seen.to_string(), "not-an-id".to_string()]);
        assert_eq!(names.ids_for("3f2a9cf"), vec![seen.to_string()]);
        assert_eq!(names.ids_for("3f2a9c").len(), 3);
        names.forget_id(seen);
        assert!(names.ids_for("3f2a9cf").is_empty());
    }

    #[test]
    fn prefixes_work_with_no_cli_at_all() {
        let mut names = ContainerNames::new();
        names.note_ids([WEB.to_string(), DB.to_string()]);
        assert_eq!(names.ids_for("3f2a9c0"), vec![WEB.to_string()]);
        assert_eq!(names.ids_for("web"), Vec::<String>::new());
    }

    #[test]
    fn short_or_non_hex_prefixes_match_nothing() {
        let names = names();
        assert!(names.ids_for("3f2").is_empty());
        assert!(names.ids_for("").is_empty());
        assert!(names.ids_for("3f2a9x").is_empty());
        assert!(names.ids_for("nosuchname").is_empty());
        assert!(names.ids_for(&format!("{WEB}0")).is_empty());
    }

    #[test]
    fn refresh_replaces_cli_names_but_keeps_seen_ids() {
        let mut names = names();
        names.note_ids([POD.to_string()]);
        names.set_cli_listings(std::iter::empty());
        assert!(names.ids_for("web").is_empty());
        assert!(names.ids_for("3f2a9c").is_empty());
        assert_eq!(names.ids_for("0123"), vec![POD.to_string()]);
    }

    #[test]
    fn runs_clis_with_a_timeout() {
        let sh = Path::new("/bin/sh");
        assert_eq!(run_with_timeout(sh, &["-c", "echo hi"], CLI_TIMEOUT).ok(), Some("hi\n".to_string()));
        assert!(run_with_timeout(sh, &["-c", "exit 3"], CLI_TIMEOUT).is_err());
        let started = Instant::now();
        assert!(run_with_timeout(sh, &["-c", "sleep 5"], Duration::from_millis(200)).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        // a listing far larger than a pipe buffer does not stall the child
        let big = run_with_timeout(
            sh,
            &["-c", "i=0; while [ $i -lt 20000 ]; do echo 0123456789; i=$((i+1)); done"],
            CLI_TIMEOUT,
        );
        assert_eq!(big.map(|t| t.len()).ok(), Some(20000 * 11));
        assert!(run_with_timeout(Path::new("/nonexistent/docker"), PS_ARGS, CLI_TIMEOUT).is_err());
    }

    #[test]
    fn refresh_without_working_clis_is_harmless() {
        // Whatever is installed here (a docker CLI with no daemon, nothing at all), refresh must
        // return within the timeouts and keep the ids seen in cgroups.
        let mut names = ContainerNames::new();
        names.note_ids([WEB.to_string()]);
        let started = Instant::now();
        names.refresh();
        assert!(started.elapsed() < CLI_TIMEOUT * 2 + Duration::from_secs(1));
        assert_eq!(names.ids_for("3f2a9c0d"), vec![WEB.to_string()]);
    }
}
