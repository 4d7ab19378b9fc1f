//! Device state from Linux's `/proc` and `/sys`: CPU, memory, temperature,
//! battery, uptime. Every file is optional: a missing or malformed file
//! leaves its field absent (or 0 for the non-optional ones) and is never an
//! error. Blocking (small reads from procfs/sysfs).

use std::path::{Path, PathBuf};

use edgefleet_proto::edgefleet::v1::DeviceTelemetry;

/// Temperatures outside this range (millidegrees) are sensor garbage
/// (disabled zones report e.g. -273 °C) and are ignored.
const PLAUSIBLE_MILLICELSIUS: std::ops::RangeInclusive<i32> = -60_000..=250_000;

/// Reads device state under a root directory ("/" on a device; a fake tree
/// in tests). The agent's own RSS always comes from the real `/proc/self`.
#[derive(Debug)]
pub struct DeviceProbe {
    root: PathBuf,
    /// The previous `/proc/stat` reading, for CPU use between samples.
    last_cpu: Option<CpuTimes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl Default for DeviceProbe {
    fn default() -> Self {
        DeviceProbe::new()
    }
}

pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

/// `Key:   1234 kB` lines of /proc/meminfo and /proc/self/status, in bytes.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => value.checked_mul(1024),
            Some(_) => None,
        }
    })
}

/// Sorted entries of a directory whose names start with `prefix`.
pub(crate) fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
        .map(|entry| entry.path())
        .collect();
    paths.sort();
    paths
}

impl DeviceProbe {
    /// Probes the real device ("/").
    pub fn new() -> DeviceProbe {
        DeviceProbe::with_root("/")
    }

    /// Probes under `root`. Takes a first CPU reading now, so the first
    /// [`sample`](Self::sample) reports use since this call.
    pub fn with_root(root: impl Into<PathBuf>) -> DeviceProbe {
        let mut probe = DeviceProbe {
            root: root.into(),
            last_cpu: None,
        };
        probe.last_cpu = probe.cpu_times();
        probe
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The device's state now; CPU use is over the time since the previous
    /// sample (or since the probe was made). `runtime` is the runtime in use.
    pub fn sample(&mut self, runtime: &str) -> DeviceTelemetry {
        let (memory_total_bytes, memory_used_bytes) = self.memory().unwrap_or((0, 0));
        let (battery_percent, charging) = match self.battery() {
            Some((percent, charging)) => (Some(percent), charging),
            None => (None, None),
        };
        DeviceTelemetry {
            cpu_permille: self.cpu_permille(),
            memory_used_bytes,
            memory_total_bytes,
            temperature_millicelsius: self.hottest_zone(),
            battery_percent,
            charging,
            uptime_seconds: self.uptime_seconds().unwrap_or(0),
            runtime: runtime.to_string(),
            agent_rss_bytes: agent_rss_bytes().unwrap_or(0),
        }
    }

    /// The hottest thermal zone, in millidegrees Celsius.
    pub fn hottest_zone(&self) -> Option<i32> {
        entries_with_prefix(&self.path("sys/class/thermal"), "thermal_zone")
            .iter()
            .filter_map(|zone| read_trimmed(&zone.join("temp"))?.parse::<i32>().ok())
            .filter(|t| PLAUSIBLE_MILLICELSIUS.contains(t))
            .max()
    }

    /// The first system battery: charge 0..=100 and whether it is charging
    /// ("Charging" → true; "Discharging", "Not charging", "Full" → false;
    /// anything else → unknown).
    pub fn battery(&self) -> Option<(u32, Option<bool>)> {
        entries_with_prefix(&self.path("sys/class/power_supply"), "")
            .iter()
            .filter(|supply| read_trimmed(&supply.join("type")).as_deref() == Some("Battery"))
            // Batteries of peripherals (mice, headsets) have scope "Device".
            .filter(|supply| read_trimmed(&supply.join("scope")).as_deref() != Some("Device"))
            .find_map(|supply| {
                let capacity: u32 = read_trimmed(&supply.join("capacity"))?.parse().ok()?;
                let charging = match read_trimmed(&supply.join("status")).as_deref() {
                    Some("Charging") => Some(true),
                    Some("Discharging" | "Not charging" | "Full") => Some(false),
                    _ => None,
                };
                Some((capacity.min(100), charging))
            })
    }

    fn cpu_times(&self) -> Option<CpuTimes> {
        let text = std::fs::read_to_string(self.path("proc/stat")).ok()?;
        let line = text.lines().find(|line| line.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        if fields.len() < 4 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user and nice).
        let total = fields
            .iter()
            .take(8)
            .fold(0u64, |sum, v| sum.saturating_add(*v));
        let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
        Some(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// CPU use of all cores since the previous call, 0..=1000.
    fn cpu_permille(&mut self) -> u32 {
        let now = self.cpu_times();
        let permille = match (self.last_cpu, now) {
            (Some(before), Some(now)) if now.total > before.total => {
                let busy = now.busy.saturating_sub(before.busy);
                let total = now.total - before.total;
                (busy.saturating_mul(1000) / total).min(1000)
            }
            _ => 0,
        };
        if now.is_some() {
            self.last_cpu = now;
        }
        u32::try_from(permille).unwrap_or(1000)
    }

    /// (total, used) bytes; used = MemTotal - MemAvailable.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.path("proc/meminfo")).ok()?;
        let total = kib_field(&text, "MemTotal")?;
        let available = kib_field(&text, "MemAvailable")
            .or_else(|| kib_field(&text, "MemFree"))
            .unwrap_or(0);
        Some((total, total.saturating_sub(available)))
    }

    pub fn uptime_seconds(&self) -> Option<u64> {
        let text = read_trimmed(&self.path("proc/uptime"))?;
        let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
        (seconds.is_finite() && seconds >= 0.0).then_some(seconds as u64)
    }
}

/// Resident memory of this process (from the real `/proc/self/status`).
pub fn agent_rss_bytes() -> Option<u64> {
    own_status_bytes("VmRSS")
}

/// Anonymous resident memory of this process (heap, stacks: `RssAnon` of
/// the real `/proc/self/status`).
pub fn agent_anonymous_bytes() -> Option<u64> {
    own_status_bytes("RssAnon")
}

fn own_status_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&text, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeRoot(tempfile::TempDir);

    impl FakeRoot {
        fn new() -> FakeRoot {
            FakeRoot(tempfile::tempdir().unwrap())
        }
        fn write(&self, path: &str, text: &str) -> &Self {
            let path = self.0.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            self
        }
        fn probe(&self) -> DeviceProbe {
            DeviceProbe::with_root(self.0.path())
        }
    }

    const MEMINFO: &str = "MemTotal:        4000000 kB\nMemFree:          500000 kB\nMemAvailable:    1000000 kB\nBuffers:  1 kB\n";

    #[test]
    fn a_hot_zone_and_a_low_discharging_battery() {
        let root = FakeRoot::new();
        root.write("sys/class/thermal/thermal_zone0/temp", "41000\n")
            .write("sys/class/thermal/thermal_zone1/temp", "87500\n")
            .write("sys/class/thermal/thermal_zone2/temp", "55000\n")
            .write("sys/class/thermal/cooling_device0/cur_state", "1\n")
            .write("sys/class/power_supply/AC/type", "Mains\n")
            .write("sys/class/power_supply/AC/online", "0\n")
            .write("sys/class/power_supply/BAT0/type", "Battery\n")
            .write("sys/class/power_supply/BAT0/capacity", "7\n")
            .write("sys/class/power_supply/BAT0/status", "Discharging\n")
            .write("proc/meminfo", MEMINFO)
            .write("proc/uptime", "12345.67 40000.00\n");
        let sample = root.probe().sample("tract");
        assert_eq!(sample.temperature_millicelsius, Some(87_500));
        assert_eq!(sample.battery_percent, Some(7));
        assert_eq!(sample.charging, Some(false));
        assert_eq!(sample.memory_total_bytes, 4_000_000 * 1024);
        assert_eq!(sample.memory_used_bytes, 3_000_000 * 1024);
        assert_eq!(sample.uptime_seconds, 12345);
        assert_eq!(sample.runtime, "tract");
        assert!(sample.agent_rss_bytes > 0, "RSS comes from the real /proc");
    }

    #[test]
    fn charging_states() {
        for (status, expected) in [
            ("Charging", Some(true)),
            ("Full", Some(false)),
            ("Not charging", Some(false)),
            ("Unknown", None),
        ] {
            let root = FakeRoot::new();
            root.write("sys/class/power_supply/battery/type", "Battery")
                .write("sys/class/power_supply/battery/capacity", "100")
                .write("sys/class/power_supply/battery/status", status);
            assert_eq!(root.probe().battery(), Some((100, expected)), "{status}");
        }
    }

    #[test]
    fn peripheral_batteries_are_not_the_device_battery() {
        let root = FakeRoot::new();
        root.write("sys/class/power_supply/hidpp_battery_0/type", "Battery")
            .write("sys/class/power_supply/hidpp_battery_0/scope", "Device")
            .write("sys/class/power_supply/hidpp_battery_0/capacity", "50");
        assert_eq!(root.probe().battery(), None);
    }

    #[test]
    fn nothing_at_all_leaves_fields_absent() {
        let root = FakeRoot::new();
        let sample = root.probe().sample("onnxruntime");
        assert_eq!(sample.temperature_millicelsius, None);
        assert_eq!(sample.battery_percent, None);
        assert_eq!(sample.charging, None);
        assert_eq!(sample.cpu_permille, 0);
        assert_eq!(sample.memory_total_bytes, 0);
        assert_eq!(sample.uptime_seconds, 0);
    }

    #[test]
    fn malformed_files_leave_fields_absent() {
        let root = FakeRoot::new();
        root.write("sys/class/thermal/thermal_zone0/temp", "hot\n")
            .write("sys/class/thermal/thermal_zone1/temp", "-273000\n")
            .write("sys/class/thermal/thermal_zone2/temp", "")
            .write("sys/class/power_supply/BAT0/type", "Battery\n")
            .write("sys/class/power_supply/BAT0/capacity", "lots\n")
            .write("proc/meminfo", "MemTotal: many kB\n")
            .write("proc/uptime", "NaN\n")
            .write("proc/stat", "cpu a b c d\n");
        std::fs::create_dir_all(root.0.path().join("sys/class/thermal/thermal_zone3")).unwrap();
        let sample = root.probe().sample("tract");
        assert_eq!(sample.temperature_millicelsius, None);
        assert_eq!(sample.battery_percent, None);
        assert_eq!(sample.memory_total_bytes, 0);
        assert_eq!(sample.uptime_seconds, 0);
        assert_eq!(sample.cpu_permille, 0);
    }

    #[test]
    fn cpu_use_is_measured_between_two_probes() {
        let root = FakeRoot::new();
        // user nice system idle iowait irq softirq steal guest guest_nice
        root.write(
            "proc/stat",
            "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n",
        );
        let mut probe = root.probe();
        // +300 busy, +100 idle: 750 per mille.
        root.write("proc/stat", "cpu  300 0 200 880 20 0 0 0 0 0\n");
        assert_eq!(probe.sample("tract").cpu_permille, 750);
        // No time passed: 0, not a division by zero.
        assert_eq!(probe.sample("tract").cpu_permille, 0);
        root.write("proc/stat", "cpu  300 0 200 1880 20 0 0 0 0 0\n");
        assert_eq!(probe.sample("tract").cpu_permille, 0);
    }

    #[test]
    fn the_real_device_can_be_probed() {
        let mut probe = DeviceProbe::new();
        let sample = probe.sample("tract");
        assert!(sample.cpu_permille <= 1000);
        if Path::new("/proc/meminfo").exists() {
            assert!(sample.memory_total_bytes > 0);
            assert!(sample.memory_used_bytes <= sample.memory_total_bytes);
        }
    }
}
