//! What this device is, for enrollment and every session's Hello. Best
//! effort: anything that cannot be read is left empty (or 0). Blocking.

use std::path::Path;

use edgefleet_proto::edgefleet::v1::Inventory;

use super::probe::{entries_with_prefix, kib_field, read_trimmed};

/// The device's inventory, read from the real `/`. `runtimes_available` are
/// the runtimes this agent can use ("onnxruntime", "tract").
pub fn collect_inventory(runtimes_available: Vec<String>) -> Inventory {
    collect_inventory_at(Path::new("/"), runtimes_available)
}

/// [`collect_inventory`] with `/proc`, `/sys`, `/dev` and `/etc` read under
/// `root` (tests). Cores fall back to the real machine's parallelism when
/// `root` has no `/proc/cpuinfo`; hostname and arch are always the real ones.
pub fn collect_inventory_at(root: &Path, runtimes_available: Vec<String>) -> Inventory {
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let memory_bytes = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|text| kib_field(&text, "MemTotal"))
        .unwrap_or(0);
    Inventory {
        cpu_model: cpu_model(&cpuinfo, root),
        cpu_cores: cpu_cores(&cpuinfo, root),
        memory_bytes,
        arch: std::env::consts::ARCH.to_string(),
        os: os_description(root),
        accelerators: accelerators(root),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        runtimes: runtimes_available,
        hostname: hostname::get()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn cpuinfo_value<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key && !v.trim().is_empty()).then(|| v.trim())
    })
}

/// x86 has "model name"; ARM boards "Model" (the board) or "Hardware" (the
/// SoC); the device tree's model is a last resort.
fn cpu_model(cpuinfo: &str, root: &Path) -> String {
    ["model name", "Model", "Hardware", "cpu model", "uarch"]
        .iter()
        .find_map(|key| cpuinfo_value(cpuinfo, key))
        .map(str::to_string)
        .or_else(|| {
            read_trimmed(&root.join("proc/device-tree/model"))
                .map(|m| m.trim_end_matches('\0').to_string())
        })
        .unwrap_or_default()
}

fn cpu_cores(cpuinfo: &str, root: &Path) -> u32 {
    let listed = cpuinfo
        .lines()
        .filter(|line| line.split(':').next().map(str::trim) == Some("processor"))
        .count();
    if (root == Path::new("/") || listed == 0)
        && let Ok(n) = std::thread::available_parallelism()
    {
        return u32::try_from(n.get()).unwrap_or(u32::MAX);
    }
    u32::try_from(listed).unwrap_or(u32::MAX)
}

fn os_description(root: &Path) -> String {
    let release = std::fs::read_to_string(root.join("etc/os-release"))
        .or_else(|_| std::fs::read_to_string(root.join("usr/lib/os-release")))
        .unwrap_or_default();
    let pretty = release
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|v| !v.is_empty());
    let kernel = read_trimmed(&root.join("proc/sys/kernel/osrelease")).filter(|k| !k.is_empty());
    match (pretty, kernel) {
        (Some(os), Some(kernel)) => format!("{os} (Linux {kernel})"),
        (Some(os), None) => os,
        (None, Some(kernel)) => format!("Linux {kernel}"),
        (None, None) => std::env::consts::OS.to_string(),
    }
}

/// Accelerators visible to the agent, best effort (device nodes and misc
/// devices), deduplicated and sorted.
fn accelerators(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let dev = root.join("dev");
    if entries_with_prefix(&dev, "nvidia")
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n != "nvidiactl"))
    {
        found.push("nvidia".to_string());
    }
    // Jetson (Tegra) GPUs have nvhost nodes instead of /dev/nvidia*.
    if !entries_with_prefix(&dev, "nvhost-gpu").is_empty()
        || !entries_with_prefix(&dev, "nvhost-ctrl-gpu").is_empty()
    {
        found.push("nvidia:tegra".to_string());
    }
    if !entries_with_prefix(&dev.join("dri"), "renderD").is_empty() {
        found.push("gpu:drm".to_string());
    }
    for path in entries_with_prefix(&root.join("sys/class/misc"), "")
        .into_iter()
        .chain(entries_with_prefix(&dev, ""))
    {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.contains("npu") {
            found.push(format!("npu:{name}"));
        } else if name.starts_with("apex_") {
            found.push("tpu:edgetpu".to_string());
        } else if name.starts_with("hailo") {
            found.push("npu:hailo".to_string());
        }
    }
    if !entries_with_prefix(&dev.join("accel"), "accel").is_empty() {
        found.push("accel".to_string());
    }
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn an_arm_board_with_an_npu() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\n\nprocessor\t: 2\n\nprocessor\t: 3\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
        );
        write(root, "proc/meminfo", "MemTotal:  3884000 kB\n");
        write(
            root,
            "etc/os-release",
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        write(root, "proc/sys/kernel/osrelease", "6.1.0-rpi7-rpi-v8\n");
        write(root, "sys/class/misc/rknpu/dev", "10:123\n");
        write(root, "dev/dri/renderD128", "");
        write(root, "dev/dri/card0", "");
        let inventory = collect_inventory_at(root, vec!["tract".into()]);
        assert_eq!(inventory.cpu_model, "Raspberry Pi 4 Model B Rev 1.4");
        assert_eq!(inventory.cpu_cores, 4);
        assert_eq!(inventory.memory_bytes, 3_884_000 * 1024);
        assert_eq!(
            inventory.os,
            "Debian GNU/Linux 12 (bookworm) (Linux 6.1.0-rpi7-rpi-v8)"
        );
        assert_eq!(inventory.accelerators, vec!["gpu:drm", "npu:rknpu"]);
        assert_eq!(inventory.runtimes, vec!["tract"]);
        assert_eq!(inventory.arch, std::env::consts::ARCH);
        assert_eq!(inventory.agent_version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn an_x86_box_with_an_nvidia_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7\n\nprocessor\t: 1\nmodel name\t: Intel(R) Core(TM) i7\n",
        );
        write(root, "dev/nvidia0", "");
        write(root, "dev/nvidiactl", "");
        let inventory = collect_inventory_at(root, vec![]);
        assert_eq!(inventory.cpu_model, "Intel(R) Core(TM) i7");
        assert_eq!(inventory.cpu_cores, 2);
        assert_eq!(inventory.accelerators, vec!["nvidia"]);
    }

    #[test]
    fn an_empty_root_gives_an_empty_but_valid_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = collect_inventory_at(dir.path(), vec![]);
        assert_eq!(inventory.cpu_model, "");
        assert!(inventory.cpu_cores >= 1);
        assert_eq!(inventory.memory_bytes, 0);
        assert_eq!(inventory.os, std::env::consts::OS);
        assert!(inventory.accelerators.is_empty());
    }

    #[test]
    fn the_real_device() {
        let inventory = collect_inventory(vec!["tract".into(), "onnxruntime".into()]);
        assert!(inventory.cpu_cores >= 1);
        assert!(!inventory.arch.is_empty());
        if Path::new("/proc/meminfo").exists() {
            assert!(inventory.memory_bytes > 0);
        }
    }
}
