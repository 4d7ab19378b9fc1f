//! Links the agent's start-up code together.
//!
//! An idle agent's memory is mostly its own code: every page of it that
//! start-up touched stays mapped, and the kernel maps whole neighbourhoods
//! (64 KB windows, or whole large folios of a freshly installed file) around
//! each page touched. Left to the compiler, the functions an agent runs from
//! `main` to idle are spread over megabytes of its code.
//! `text-order.txt` lists them (`scripts/order-agent-text.py` records them
//! by running the agent under callgrind), by name and again as globs that
//! leave out Cargo's hashes (src/text_order.rs), and the linker script
//! written from it places them side by side in `.text`: the idle
//! agent maps far less of its code (docs/benchmarks.md, footprint: idle RSS
//! about halved). After a dependency or toolchain update the globs still
//! find most of them; what nothing matches is skipped: a stale list costs
//! memory, never a build.
//!
//! Only release builds for Linux (glibc), linked by rustc's own lld (x86_64)
//! or by a compiler driver whose linker is GNU ld or lld (every other
//! target: a cross build for a device), which read the script alike. Where
//! the linker is chosen otherwise (`-fuse-ld`, `--ld-path`,
//! `-C linker-flavor`) or is another one (gold, mold), the build is left
//! alone.
//!
//! `EDGEFLEET_AGENT_LINK_MAP=PATH` also writes the linker's map of the agent
//! (where each function landed) to PATH: the ordering script reads it.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/text_order.rs"]
mod text_order;

fn main() {
    println!("cargo::rerun-if-changed=text-order.txt");
    println!("cargo::rerun-if-changed=src/text_order.rs");
    println!("cargo::rerun-if-env-changed=EDGEFLEET_AGENT_LINK_MAP");
    let var = |name: &str| env::var(name).unwrap_or_default();
    // What decides below which linker runs: the environment, and a `linker`
    // in a Cargo config file (which reaches this script as RUSTC_LINKER).
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::home_dir().map(|home| home.join(".cargo")));
    for config in
        text_order::cargo_config_files(Path::new(&var("CARGO_MANIFEST_DIR")), cargo_home.as_deref())
    {
        println!("cargo::rerun-if-changed={}", config.display());
    }
    let target = var("TARGET").to_uppercase().replace(['-', '.'], "_");
    for name in [
        "RUSTFLAGS".to_string(),
        "CARGO_ENCODED_RUSTFLAGS".to_string(),
        "CARGO_BUILD_RUSTFLAGS".to_string(),
        format!("CARGO_TARGET_{target}_LINKER"),
        format!("CARGO_TARGET_{target}_RUSTFLAGS"),
    ] {
        println!("cargo::rerun-if-env-changed={name}");
    }
    if var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        || var("PROFILE") != "release"
    {
        return;
    }
    let rustflags: Vec<String> = var("CARGO_ENCODED_RUSTFLAGS")
        .split('\x1f')
        .map(str::to_string)
        .collect();
    let flags_mention = |word: &str| rustflags.iter().any(|flag| flag.contains(word));
    if ["fuse-ld", "ld-path", "linker-flavor"]
        .into_iter()
        .any(flags_mention)
    {
        return;
    }
    let linker = env::var("RUSTC_LINKER")
        .ok()
        .or_else(|| linker_flag(&rustflags));
    // A driver named by its path may be a wrapper script, edited in place.
    if let Some(driver) = linker.as_deref().filter(|linker| linker.contains('/')) {
        println!("cargo::rerun-if-changed={driver}");
    }
    let links_with_rust_lld = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && linker.is_none()
        && !flags_mention("linker-features")
        && !flags_mention("link-self-contained");
    if !links_with_rust_lld && !driver_links_with_gnu_ld_or_lld(linker.as_deref().unwrap_or("cc")) {
        return;
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("text-order.txt");
    let Ok(list) = fs::read_to_string(&order) else {
        return;
    };
    let script = match text_order::linker_script(&list) {
        Ok(script) => script,
        Err(error) => {
            println!(
                "cargo::warning=agent/text-order.txt is not used: {error} \
                 (scripts/order-agent-text.py writes it)"
            );
            return;
        }
    };
    let script_path = Path::new(&var("OUT_DIR")).join("text-order.ld");
    fs::write(&script_path, script).expect("cannot write the agent's linker script to OUT_DIR");
    // `-Xlinker ARG` rather than `-Wl,ARG`: a path may hold a comma.
    let linker_arg = |arg: String| {
        println!("cargo::rustc-link-arg-bin=edgefleet-agent=-Xlinker");
        println!("cargo::rustc-link-arg-bin=edgefleet-agent={arg}");
    };
    linker_arg(format!("--script={}", script_path.display()));
    if let Some(map) = env::var_os("EDGEFLEET_AGENT_LINK_MAP") {
        linker_arg(format!("-Map={}", Path::new(&map).display()));
    }
}

/// The linker `-C linker=PATH` in the rustflags names, if any.
fn linker_flag(rustflags: &[String]) -> Option<String> {
    let mut flags = rustflags.iter().map(String::as_str);
    while let Some(flag) = flags.next() {
        let codegen = match flag {
            "-C" => flags.next().unwrap_or_default(),
            _ => flag.strip_prefix("-C").unwrap_or_default(),
        };
        if let Some(linker) = codegen.strip_prefix("linker=") {
            return Some(linker.to_string());
        }
    }
    None
}

/// Asks the compiler driver rustc links through (`cc`, `aarch64-linux-gnu-gcc`,
/// `clang`…) which linker it runs.
fn driver_links_with_gnu_ld_or_lld(driver: &str) -> bool {
    let Ok(output) = Command::new(driver).arg("-Wl,--version").output() else {
        return false;
    };
    let printed = [output.stdout, output.stderr].concat();
    output.status.success()
        && text_order::linker_reads_the_script(&String::from_utf8_lossy(&printed))
}
