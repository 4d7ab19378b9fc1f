//! Running a benchmark's client, its raw runs and the agent it starts on one
//! CPU, as `taskset -c N` or systemd's `CPUAffinity=` would: a call then
//! never has to wake an idle CPU, and nothing polls.

// Through libc, not rustix: rustix's `thread` feature would do it without
// `unsafe`, but turning the feature on for the benchmark changes rustix's
// build, and with it the symbol names of everything the agent links above it
// (clap, tract) when the agent is built with the benchmark, so
// agent/text-order.txt's exact names stop matching (measured: idle RSS
// 5.8 → 6.8 MB).
use std::io;
use std::mem;

/// The calling thread held to one CPU; its CPUs are given back when dropped.
///
/// Linux's affinity is per thread and inherited: threads this one starts
/// from now on, and processes it spawns (an agent), run on that CPU too;
/// threads started before keep theirs.
pub struct OneCpu {
    previous: libc::cpu_set_t,
    cpu: usize,
}

impl OneCpu {
    /// Moves the calling thread to the first CPU it may run on.
    #[allow(unsafe_code)] // libc's CPU_* set operations; see the SAFETY note.
    pub fn pin() -> io::Result<OneCpu> {
        let previous = affinity()?;
        // SAFETY: CPU_ISSET reads within the set for every index below CPU_SETSIZE.
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &previous) })
            .ok_or_else(|| io::Error::other("this thread may run on no CPU"))?;
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it.
        let mut only = unsafe { mem::zeroed::<libc::cpu_set_t>() };
        unsafe { libc::CPU_SET(cpu, &mut only) };
        set_affinity(&only)?;
        Ok(OneCpu { previous, cpu })
    }

    /// The CPU the thread is held to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        if let Err(err) = set_affinity(&self.previous) {
            eprintln!("cannot give the benchmark thread its CPUs back: {err}");
        }
    }
}

#[allow(unsafe_code)] // the syscall; see the SAFETY note.
fn affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes
    // into the set; pid 0 is the calling thread.
    let mut set = unsafe { mem::zeroed::<libc::cpu_set_t>() };
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

#[allow(unsafe_code)] // the syscall; see the SAFETY note.
fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: the set is a valid cpu_set_t of the size given; pid 0 is the
    // calling thread.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(unsafe_code)] // CPU_COUNT and sched_getcpu read only.
mod tests {
    use super::*;

    fn cpus_allowed() -> usize {
        let set = affinity().unwrap();
        unsafe { libc::CPU_COUNT(&set) as usize }
    }

    fn cpu_now() -> usize {
        unsafe { libc::sched_getcpu() as usize }
    }

    #[test]
    fn pinning_holds_the_thread_and_what_it_starts_to_one_cpu_and_dropping_gives_its_cpus_back() {
        let before = cpus_allowed();
        let pinned = OneCpu::pin().unwrap();
        assert_eq!(cpus_allowed(), 1);
        assert_eq!(cpu_now(), pinned.cpu());
        let cpu = pinned.cpu();
        let (started_allowed, started_on) = std::thread::spawn(|| (cpus_allowed(), cpu_now()))
            .join()
            .unwrap();
        assert_eq!(
            (started_allowed, started_on),
            (1, cpu),
            "a thread started while pinned runs on the same CPU"
        );
        let child = std::process::Command::new("grep")
            .args(["Cpus_allowed_list", "/proc/self/status"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&child.stdout)
                .split_whitespace()
                .last(),
            Some(cpu.to_string().as_str()),
            "a process started while pinned runs on the same CPU"
        );
        drop(pinned);
        assert_eq!(cpus_allowed(), before);
    }
}
