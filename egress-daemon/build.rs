//! Builds the kernel programs (`egress-ebpf`) with the BPF toolchain and leaves the object in
//! `OUT_DIR/egress.bpf.o` for `include_bytes_aligned!`.
//!
//! aya-build does not fit the toolchain here (it forces rustup and `-Z build-std`); the Debian
//! rustc ships a prebuilt `core` for `bpfel-unknown-none`, so plain cargo with that rustc works.

use std::{env, path::PathBuf, process::Command};

const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../egress-ebpf");
    let common_dir = manifest_dir.join("../egress-common");
    for dir in [ebpf_dir.join("src"), common_dir.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("Cargo.toml").display());

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // One BPF target dir for every profile of the outer build, so the kernel crate is built once.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target"))
        .join("bpf");
    for tool in [BPF_RUSTC, BPF_CARGO] {
        if !PathBuf::from(tool).exists() {
            panic!("{tool} is missing: the kernel programs need the BPF toolchain; run `cargo xtask setup` first");
        }
    }

    let mut cmd = Command::new(BPF_CARGO);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", BPF_RUSTC)
        // `egress` (the kernel crate) uses BPF inline assembly for atomic counter adds.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,egress")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        // The outer build's settings are for the host toolchain, not this one.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_") || key == "RUSTDOC" {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("could not start the BPF cargo");
    assert!(
        status.success(),
        "building egress-ebpf failed (see above); `cargo xtask setup` installs the BPF toolchain"
    );

    let object = target_dir.join("bpfel-unknown-none/release/egress");
    std::fs::copy(&object, out_dir.join("egress.bpf.o")).expect("copy the kernel object");
    // `egress --version` names the build of the programs it embeds: two binaries of one release
    // built from different kernel sources (or toolchains) tell themselves apart.
    let bytes = std::fs::read(&object).expect("read the kernel object");
    println!("cargo:rustc-env=EGRESS_PROGRAMS_BUILD={:016x}", fnv1a(&bytes));
}

/// FNV-1a 64: a stable digest with no dependency (not for security: it names a build).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}
