//! `agent/text-order.txt` as a linker script: the functions the agent runs
//! from start to idle, placed first in `.text`, side by side (agent/build.rs
//! links the release agent with it). The rest of the code follows them in
//! `.text` as the linker lays it out anyway (a script that names an output
//! section which the default layout also fills gets the rest appended), so
//! profilers and debuggers that look for the code in `.text` still find all
//! of it.
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
//! mapped than with a fresh list, far less than with none). Lines starting
//! with `#` are comments.
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

/// The linker script: the listed functions, in the list's order, first in
/// `.text`, which stays where the default layout puts it, after
/// `.eh_frame` (an `INSERT` script amends the default layout instead of
/// replacing it).
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
    script.push_str("  }\n} INSERT AFTER .eh_frame;\n");
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(&lines[4..], ["  }", "} INSERT AFTER .eh_frame;"]);
    }

    #[test]
    fn a_line_a_linker_script_could_not_hold_is_refused_with_its_number() {
        let error = linker_script("main\n# fine\nfoo) bar\n").unwrap_err();
        assert!(error.starts_with("line 3: ')'"), "{error}");
        let error = linker_script("\"quoted\"").unwrap_err();
        assert!(error.starts_with("line 1: '\"'"), "{error}");
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
