//! `agent/text-order.txt` as a linker script: the functions the agent runs
//! from start to idle, placed side by side in `.text` (agent/build.rs links
//! the release agent with it). The script amends the linker's default layout
//! (`INSERT`) instead of replacing it, and reads alike to the two linkers a
//! Linux build meets, rustc's own lld on x86_64 and GNU ld, the system
//! linker of every other target (a cross build for a device): lld puts the
//! listed functions first in `.text` and appends the rest of the code after
//! them, one section as without a script (so profilers and debuggers that
//! look for the code in `.text` still find all of it); GNU ld makes them an
//! output section of their own, also named `.text`, right after the rest of
//! the code, in the same executable segment. `INSERT BEFORE .fini` is the
//! anchor both take so: lld refuses `.text` before `.text`, and GNU ld would
//! put the functions after `.eh_frame` (where lld's default layout has
//! `.text`) in a segment of their own after the read-only data.
//!
//! Each line of the list names one function's symbol, or a glob of one: the
//! exact names of the functions that ran when the list was recorded first,
//! then the same names with `*` for the parts that change from build to build
//! (Cargo's hash in a legacy Rust name, `…17h*E`; a crate's disambiguator in
//! a v0 name, `Cs*_`; LLVM's `.N` suffix of a local copy). The linker takes
//! each function for the first pattern it matches, in the list's order: with
//! the names current the exact ones take exactly the functions that ran, and
//! the globs then only other instances of generic ones, placed after them;
//! after a dependency or toolchain update changed the names, the globs take
//! the functions that ran, with those other instances among them (more code
//! mapped than with a fresh list, far less than with none). A build for
//! another target has other hashes: the globs take its functions likewise.
//! Lines starting with `#` are comments.
//!
//! This file is compiled twice: into agent/build.rs (`#[path]`) and, for its
//! tests, into the library.

use std::fmt::Write;

/// The prefixes LLVM puts before a function's name in its section's name
/// without profile data: none, or `unlikely.` for a cold function. (Each
/// one more costs every release link of the agent seconds of matching.)
const SECTION_PREFIXES: [&str; 2] = ["", "unlikely."];

/// The patterns of a list (comments and blank lines skipped), each checked:
/// an error names the first line a linker script could not hold.
pub fn patterns(list: &str) -> Result<Vec<&str>, String> {
    let mut patterns = Vec::new();
    for (number, line) in list.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Rust's legacy and v0 manglings, C names and the globs above use
        // only these; anything else (a space, a parenthesis, a quote) would
        // end the pattern or the script early.
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.$*".contains(c);
        if let Some(bad) = line.chars().find(|c| !allowed(*c)) {
            return Err(format!(
                "line {}: {bad:?} cannot be part of a function's name: {line:?}",
                number + 1
            ));
        }
        patterns.push(line);
    }
    Ok(patterns)
}

/// The linker script: the listed functions, in the list's order, side by
/// side in `.text` (see the top of this file for where each linker puts
/// them).
pub fn linker_script(list: &str) -> Result<String, String> {
    let mut script = String::from("SECTIONS {\n  .text : {\n");
    for pattern in patterns(list)? {
        script.push_str("    *(");
        for (i, prefix) in SECTION_PREFIXES.iter().enumerate() {
            let separator = if i == 0 { "" } else { " " };
            let _ = write!(script, "{separator}.text.{prefix}{pattern}");
        }
        script.push_str(")\n");
    }
    script.push_str("  }\n} INSERT BEFORE .fini;\n");
    Ok(script)
}

/// Whether the linker that printed `version` (its `--version` output, as a
/// compiler driver prints it for `-Wl,--version`) reads the script as this
/// file expects: GNU ld and lld do; gold and mold do not take `INSERT`
/// scripts alike (or at all), and a linker not recognised is not tried.
pub fn linker_reads_the_script(version: &str) -> bool {
    version.lines().any(|line| {
        let line = line.trim();
        line.starts_with("GNU ld ")
            || (line.contains("LLD ") && line.ends_with("(compatible with GNU linkers)"))
    })
}

/// The Cargo configuration files a build of the package in `package_dir`
/// may read, those that exist: `.cargo/config.toml` and `.cargo/config` in
/// that directory and every one above it, then in Cargo's home. A `linker`
/// set there for the target decides which linker runs, and Cargo runs a
/// build script again when a file it names changes; it does not on its own
/// when only the linker of a target other than the host's changes (a cross
/// build's), so the decision would outlive the linker it was made for.
pub fn cargo_config_files(
    package_dir: &std::path::Path,
    cargo_home: Option<&std::path::Path>,
) -> Vec<std::path::PathBuf> {
    package_dir
        .ancestors()
        .map(|dir| dir.join(".cargo"))
        .chain(cargo_home.map(std::path::Path::to_path_buf))
        .flat_map(|dir| [dir.join("config.toml"), dir.join("config")])
        .filter(|file| file.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_files_a_build_reads_are_found_above_the_package_and_in_cargos_home() {
        let root = tempfile::tempdir().unwrap();
        let package = root.path().join("workspace").join("agent");
        let home = root.path().join("cargo-home");
        for dir in [
            &package,
            &home,
            &root.path().join("workspace").join(".cargo"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let workspace_config = root.path().join("workspace/.cargo/config.toml");
        let home_config = home.join("config");
        std::fs::write(&workspace_config, "[target.aarch64-unknown-linux-gnu]\n").unwrap();
        std::fs::write(&home_config, "").unwrap();
        // A directory named like a config file is not one.
        std::fs::create_dir_all(package.join(".cargo/config.toml")).unwrap();
        // Only what lies in this test's tree: a machine may have config
        // files above the temporary directory too.
        let found = |home: Option<&std::path::Path>| -> Vec<std::path::PathBuf> {
            cargo_config_files(&package, home)
                .into_iter()
                .filter(|file| file.starts_with(root.path()))
                .collect()
        };
        assert_eq!(
            found(Some(&home)),
            vec![workspace_config.clone(), home_config]
        );
        assert_eq!(found(None), vec![workspace_config]);
    }

    #[test]
    fn each_listed_function_is_taken_under_every_section_prefix_in_order() {
        let script = linker_script("# comment\nmain\n\n_ZN5tokio4main17h*E\n").unwrap();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "SECTIONS {");
        assert_eq!(lines[1], "  .text : {");
        assert_eq!(lines[2], "    *(.text.main .text.unlikely.main)");
        assert_eq!(
            lines[3],
            "    *(.text._ZN5tokio4main17h*E .text.unlikely._ZN5tokio4main17h*E)"
        );
        assert_eq!(&lines[4..], ["  }", "} INSERT BEFORE .fini;"]);
    }

    #[test]
    fn a_line_a_linker_script_could_not_hold_is_refused_with_its_number() {
        let error = linker_script("main\n# fine\nfoo) bar\n").unwrap_err();
        assert!(error.starts_with("line 3: ')'"), "{error}");
        let error = linker_script("\"quoted\"").unwrap_err();
        assert!(error.starts_with("line 1: '\"'"), "{error}");
    }

    #[test]
    fn gnu_ld_and_lld_are_recognised_by_their_version_and_gold_and_mold_are_not() {
        // As `cc -Wl,--version` prints them: the driver's line first.
        let gnu_ld = "collect2 version 12.2.0\n/usr/bin/ld -plugin … --version\n\
                      GNU ld (GNU Binutils for Debian) 2.40\nCopyright (C) 2023 Free Software Foundation, Inc.\n";
        assert!(linker_reads_the_script(gnu_ld));
        let cross_gnu_ld = "GNU ld (GNU Binutils for Ubuntu) 2.42\n";
        assert!(linker_reads_the_script(cross_gnu_ld));
        assert!(linker_reads_the_script(
            "LLD 22.1.2 (/checkout/src/llvm-project/llvm 1cb4e38) (compatible with GNU linkers)\n"
        ));
        assert!(linker_reads_the_script(
            "Ubuntu LLD 18.1.3 (compatible with GNU linkers)\n"
        ));
        assert!(!linker_reads_the_script(
            "collect2 version 12.2.0\nGNU gold (GNU Binutils for Debian 2.40) 1.16\n"
        ));
        assert!(!linker_reads_the_script(
            "mold 2.34.1 (compatible with GNU ld)\n"
        ));
        assert!(!linker_reads_the_script(""));
        assert!(!linker_reads_the_script(
            "cc: error: unrecognized command-line option\n"
        ));
    }

    /// Links a small program with the script the list below makes, by
    /// `linker` (`rustc_flags` choose it), runs it, and checks where its
    /// functions landed: the listed ones side by side, in the list's order
    /// (the reverse of the source's), the glob's after the exact names, and
    /// the unlisted ones outside them.
    fn link_and_check_the_order(linker: Linker, rustc_flags: &[&str]) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("ordered.rs");
        let mut program = String::new();
        let names = [
            "unlisted_before",
            "listed_third_by_glob",
            "listed_second",
            "listed_first",
            "unlisted_after",
        ];
        for (i, name) in names.iter().enumerate() {
            let _ = writeln!(
                program,
                "#[no_mangle] #[inline(never)] pub fn {name}(x: u64) -> u64 {{ \
                 std::hint::black_box(x).wrapping_mul({}).rotate_left({}) }}",
                i + 3,
                i + 1
            );
        }
        // It also prints how its ELF header and its read-only data are
        // mapped: a script that moved code among them would make them
        // executable.
        program.push_str(PERMISSIONS_OF);
        program.push_str("fn main() {\n");
        for name in names {
            let _ = writeln!(
                program,
                "    println!(\"{name} {{}} {{}}\", {name} as fn(u64) -> u64 as usize, {name}(7));"
            );
        }
        program.push_str(
            "    println!(\"headers {} 0\", permissions_of(unsafe { std::ptr::addr_of!(__ehdr_start) } as usize));\n\
             \x20   println!(\"read_only_data {} 0\", permissions_of(std::hint::black_box(&TABLE) as *const _ as usize));\n}\n",
        );
        std::fs::write(&source, program).unwrap();
        let script = dir.path().join("order.ld");
        std::fs::write(
            &script,
            linker_script("# the list\nlisted_first\nlisted_second\nlisted_third_by_*\n").unwrap(),
        )
        .unwrap();
        let binary = dir.path().join("ordered");
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
        let output = std::process::Command::new(rustc)
            .args(["--edition", "2021", "-O", "-o"])
            .arg(&binary)
            .arg(&source)
            .args(rustc_flags)
            .args(["-C", "link-arg=-Xlinker"])
            .arg(format!("-Clink-arg=--script={}", script.display()))
            .output()
            .expect("run rustc");
        assert!(
            output.status.success(),
            "rustc {rustc_flags:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let run = std::process::Command::new(&binary).output().unwrap();
        assert!(run.status.success(), "the linked program failed: {run:?}");
        let stdout = String::from_utf8(run.stdout).unwrap();
        let address = |name: &str| -> usize {
            let line = stdout
                .lines()
                .find(|line| line.split(' ').next() == Some(name))
                .unwrap_or_else(|| panic!("{name} missing from {stdout}"));
            line.split(' ').nth(1).unwrap().parse().unwrap()
        };
        for data in ["headers", "read_only_data"] {
            let line = stdout.lines().find(|line| line.starts_with(data)).unwrap();
            assert!(
                !line.split(' ').nth(1).unwrap().contains('x'),
                "{data} mapped executable ({rustc_flags:?}): {stdout}"
            );
        }
        let listed = [
            address("listed_first"),
            address("listed_second"),
            address("listed_third_by_glob"),
        ];
        assert!(
            listed[0] < listed[1] && listed[1] < listed[2],
            "not in the list's order ({rustc_flags:?}): {stdout}"
        );
        for unlisted in ["unlisted_before", "unlisted_after"] {
            let at = address(unlisted);
            assert!(
                at < listed[0] || at > listed[2],
                "{unlisted} landed among the listed functions ({rustc_flags:?}): {stdout}"
            );
        }
        // lld names itself in the binary's `.comment`; GNU ld does not.
        let binary = std::fs::read(&binary).unwrap();
        let by_lld = binary.windows(11).any(|window| window == b"Linker: LLD");
        assert_eq!(
            by_lld,
            linker == Linker::Lld,
            "linked by the other linker ({rustc_flags:?})"
        );
    }

    /// The test program's lookup of an address in its own memory map, and
    /// the data it looks up.
    const PERMISSIONS_OF: &str = r#"
static TABLE: [u8; 64] = [7; 64];
extern "C" { static __ehdr_start: u8; }
fn permissions_of(address: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next().unwrap().split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if start <= address && address < end {
            return fields.next().unwrap().to_string();
        }
    }
    "unmapped".to_string()
}
"#;

    #[derive(Debug, PartialEq)]
    enum Linker {
        GnuLd,
        Lld,
    }

    /// GNU ld: the system linker of a cross build for a device (here the
    /// host's `cc`, rustc told not to use its own lld).
    #[test]
    fn gnu_ld_places_the_listed_functions_side_by_side_in_order() {
        let flags: &[&str] = if cfg!(target_arch = "x86_64") {
            &["-Clinker-features=-lld", "-Clink-self-contained=-linker"]
        } else {
            &[]
        };
        link_and_check_the_order(Linker::GnuLd, flags);
    }

    /// lld: how rustc links for x86_64 Linux by default.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rusts_own_lld_places_the_listed_functions_side_by_side_in_order() {
        link_and_check_the_order(Linker::Lld, &[]);
    }

    /// The committed list (`scripts/order-agent-text.py` writes it): every
    /// line usable, none twice, the program's entry among them.
    #[test]
    fn the_committed_list_names_each_function_once_and_the_entry_point() {
        let patterns = patterns(include_str!("../text-order.txt")).unwrap();
        assert!(
            patterns.len() >= 500,
            "only {} functions listed",
            patterns.len()
        );
        let mut seen = std::collections::HashSet::new();
        for pattern in &patterns {
            assert!(seen.insert(pattern), "listed twice: {pattern}");
        }
        assert!(
            patterns.contains(&"main"),
            "the program's entry is not listed"
        );
        // The globs, which outlive a dependency update, come after every
        // exact name, so they take only what the exact names left.
        let first_glob = patterns.iter().position(|p| p.contains('*'));
        let first_glob = first_glob.expect("the list has no globs");
        let exact_after = patterns[first_glob..].iter().find(|p| !p.contains('*'));
        assert!(
            exact_after.is_none(),
            "an exact name among the globs: {exact_after:?}"
        );
    }
}
