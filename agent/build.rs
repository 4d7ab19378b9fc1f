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
//! written from it places them first in `.text`, side by side: the idle
//! agent maps far less of its code (docs/benchmarks.md, footprint: idle RSS
//! about halved). After a dependency or toolchain update the globs still
//! find most of them; what nothing matches is skipped: a stale list costs
//! memory, never a build.
//!
//! Only release builds for x86_64 Linux (glibc), which rustc links with its
//! own lld; another linker (a configured `linker`, `-C linker-flavor`, a
//! cross build) may not read the script, so those builds are left alone.
//!
//! `EDGEFLEET_AGENT_LINK_MAP=PATH` also writes lld's map of the agent (where
//! each function landed) to PATH: the ordering script reads it.

use std::env;
use std::fs;
use std::path::Path;

#[path = "src/text_order.rs"]
mod text_order;

fn main() {
    println!("cargo::rerun-if-changed=text-order.txt");
    println!("cargo::rerun-if-changed=src/text_order.rs");
    println!("cargo::rerun-if-env-changed=EDGEFLEET_AGENT_LINK_MAP");
    let var = |name: &str| env::var(name).unwrap_or_default();
    let rustflags = var("CARGO_ENCODED_RUSTFLAGS");
    let links_with_rust_lld = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && env::var_os("RUSTC_LINKER").is_none()
        && !rustflags.contains("linker")
        && !rustflags.contains("link-self-contained");
    if !links_with_rust_lld || var("PROFILE") != "release" {
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
