//! `cargo xtask bench`: egress side by side with no filter, nftables, iptables, ipset and a
//! reference C filter, in network namespaces the benchmark creates (see BENCH.md).
//!
//! The measuring is done by the scripts in `bench/`; this sets the machine up, builds the daemon
//! and the C tools into `target/bench/bin`, runs `bench/run_all.sh` and, after a full run, puts
//! its table into BENCH.md.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{
    build,
    setup::{self, Scope, Verbosity},
    sys, workspace,
};

/// Where BENCH.md's generated part starts and ends; the prose around it is written by hand.
const BEGIN_MARKER: &str = "<!-- bench:results:begin (written by `cargo xtask bench`) -->";
const END_MARKER: &str = "<!-- bench:results:end -->";

/// `cargo xtask bench [--quick]`.
pub fn bench_command(quick: bool) -> Result<()> {
    sys::require_root(
        "`cargo xtask bench` (it creates network namespaces and a cgroup, loads BPF programs and firewall rules)",
    )?;
    let toolchain = setup::ensure(Scope::Bench, Verbosity::Summary)?;
    let daemon = build::build_daemon(&toolchain)?;

    let out = workspace::target_dir().join("bench");
    let bin = out.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    // Run a copy: a rebuild of target/release/egress during the run must not change what is measured.
    let egress = bin.join("egress");
    fs::copy(&daemon, &egress).with_context(|| format!("copy {} to {}", daemon.display(), egress.display()))?;
    build_tools(&workspace::root().join("bench").join("src"), &bin)?;

    let mut cmd = Command::new("bash");
    cmd.arg(workspace::root().join("bench").join("run_all.sh"))
        .env("BENCH_OUT", &out)
        .env("BENCH_BIN", &bin)
        .env("EGRESS_BIN", &egress)
        .env("QUICK", if quick { "1" } else { "0" })
        // The JSON lines go to target/bench/results.jsonl; the terminal gets the progress log.
        .stdout(Stdio::null());
    println!(
        "running the {} benchmark (progress below, per-point logs in {})",
        if quick { "quick smoke" } else { "full" },
        out.join("logs").display()
    );
    let status = cmd.status().context("could not start bash bench/run_all.sh")?;

    let table = out.join("results.md");
    if let Ok(text) = fs::read_to_string(&table) {
        println!("\n{text}");
    }
    println!("results: {} and {}", out.join("results.jsonl").display(), table.display());
    if !status.success() {
        bail!("the benchmark failed ({status}); see the messages above and target/bench/logs/");
    }
    if !quick {
        let doc = workspace::root().join("BENCH.md");
        update_bench_md(&doc, &fs::read_to_string(&table).context("read results.md")?)?;
        println!("updated the table in {}", doc.display());
    }
    Ok(())
}

/// Builds tcpconn, bpfstat and the reference filter (`egress_ref` + its BPF object) into `bin`.
fn build_tools(src: &Path, bin: &Path) -> Result<()> {
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let c = |name: &str, libs: &[&str]| -> Command {
        let mut cmd = Command::new("cc");
        cmd.args(["-O2", "-Wall", "-o"]).arg(bin.join(name)).arg(src.join(format!("{name}.c"))).args(libs);
        cmd
    };
    sys::run(&mut c("tcpconn", &[]))?;
    sys::run(&mut c("bpfstat", &["-lbpf"]))?;
    sys::run(&mut c("egress_ref", &["-lbpf"]))?;
    sys::run(
        Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-I"])
            .arg(arch_include)
            .arg("-c")
            .arg(src.join("egress_ref.bpf.c"))
            .arg("-o")
            .arg(bin.join("egress_ref.bpf.o")),
    )?;
    println!("built the bench tools into {}", bin.display());
    Ok(())
}

/// Replaces the generated part of BENCH.md with `table`, keeping the hand-written prose.
fn update_bench_md(doc: &Path, table: &str) -> Result<()> {
    let text = fs::read_to_string(doc).unwrap_or_default();
    let updated = replace_generated(&text, table);
    fs::write(doc, updated).with_context(|| format!("write {}", doc.display()))
}

/// `text` with everything between the markers replaced by `table`; the markers and the table
/// are appended when `text` has no (complete) pair of markers.
fn replace_generated(text: &str, table: &str) -> String {
    let block = format!("{BEGIN_MARKER}\n{}\n{END_MARKER}", table.trim_end());
    if let Some(start) = text.find(BEGIN_MARKER) {
        if let Some(end_rel) = text[start..].find(END_MARKER) {
            let end = start + end_rel + END_MARKER.len();
            return format!("{}{block}{}", &text[..start], &text[end..]);
        }
    }
    let mut out = text.trim_end().to_owned();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(&block);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_generated_part() {
        let doc = format!("# Bench\n\nintro\n\n{BEGIN_MARKER}\nold table\n{END_MARKER}\n\n## Reading\n\nprose\n");
        let new = replace_generated(&doc, "| new | table |\n");
        assert_eq!(
            new,
            format!("# Bench\n\nintro\n\n{BEGIN_MARKER}\n| new | table |\n{END_MARKER}\n\n## Reading\n\nprose\n")
        );
        // Idempotent.
        assert_eq!(replace_generated(&new, "| new | table |"), new);
    }

    #[test]
    fn appends_when_markers_are_missing() {
        assert_eq!(replace_generated("# Bench\n", "t"), format!("# Bench\n\n{BEGIN_MARKER}\nt\n{END_MARKER}\n"));
        assert_eq!(replace_generated("", "t"), format!("{BEGIN_MARKER}\nt\n{END_MARKER}\n"));
        // A lone begin marker is not a pair: append rather than eat the rest of the file.
        let broken = format!("a\n{BEGIN_MARKER}\nb\n");
        assert!(replace_generated(&broken, "t").starts_with(&broken.trim_end().to_owned()));
    }
}
