//! Memory the agent no longer needs, given back: the relocation table once
//! it has started, and the heap a model's load or unload freed.
//!
//! The agent is a position-independent executable. Before `main` runs, the
//! dynamic loader applies its relative relocations (about 44,000 of them,
//! mostly vtables and string references) from the `.rela.dyn` table, about
//! 1 MB, and nothing reads that table again. Its pages are clean and
//! file-backed, yet they stay mapped and count in the agent's RSS for its
//! whole life. [`release_relocation_table`] unmaps them with
//! `madvise(MADV_DONTNEED)`: the RSS drops by that much and the kernel may
//! reclaim the pages. Should anything read the table again, the kernel pages
//! it back in from the executable file, so nothing can break.
//!
//! Packed relative relocations (`-z pack-relative-relocs`, DT_RELR) would
//! shrink the table itself, but need glibc 2.36 on the device, which Ubuntu
//! 22.04 (and so NVIDIA JetPack 6) does not have.
//!
//! A model's session holds its weights (megabytes) in the heap, and loading
//! one allocates more for a while (the parsed graph, tract's optimisation
//! passes). glibc's allocator keeps what is freed for later allocations
//! instead of giving it back: each hot reload or model update would leave
//! the agent tens of megabytes larger (a 4 MB model's anonymous memory grew
//! by ~30 MB over a few reloads on either runtime, and stayed there).
//! [`release_freed_heap`] hands the free pages back (`malloc_trim`); the
//! model registry calls it after it loads or unloads versions, and whoever
//! drops a version's last session (its worker thread, as a rule) calls it
//! then.
//!
//! Large requests grow the heap too. glibc gives a block of 128 KiB or more
//! pages of its own at first, but each time it frees one it raises that
//! threshold to the block's size, up to 32 MiB: after the first large
//! request, request bodies, tensors and the model's activations for them
//! come from the heap of the thread that served them, and every thread's
//! heap keeps the most it ever held: the footprint benchmark's burst (24
//! requests of 2048 rows of bench_mlp, four at a time) left tract's agent
//! with 90 MB of anonymous memory, against 7 before it, for good. Reusing
//! that memory while requests come is what makes them fast (fixing the
//! threshold at 1 MiB instead, so such blocks are unmapped when freed,
//! made the same burst 7–14 % slower: five times the page faults).
//! So [`keep_heap_small`] gives it back afterwards, as jemalloc's decay
//! returns freed pages some seconds later: every [`HEAP_CHECK_INTERVAL`] it
//! compares the agent's anonymous memory with what the heap has handed
//! out, and trims the heap once the difference has grown by
//! [`HEAP_GROWTH_TO_TRIM`].

// The auxiliary vector, the program headers and madvise are raw memory,
// and malloc_trim and mallinfo2 C calls; this module is the agent's only
// unsafe code but for two raw ONNX Runtime calls in runtime/onnxruntime.rs
// (a string tensor filled with lengths, and whether an input or output has
// a shape), and reads nothing it did not check.
#![allow(unsafe_code)]

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The executable's relocation table: its address and size in bytes, when it
/// lies in a read-only, file-backed segment (the only case it is safe to drop).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub fn relocation_table() -> Option<(usize, usize)> {
    const DT_NULL: u64 = 0;
    const DT_RELA: u64 = 7;
    const DT_RELASZ: u64 = 8;
    const PF_W: u32 = 2;

    // SAFETY: getauxval only reads the auxiliary vector the kernel gave us.
    let (phdr, phnum) = unsafe {
        (
            libc::getauxval(libc::AT_PHDR) as usize,
            libc::getauxval(libc::AT_PHNUM) as usize,
        )
    };
    if phdr == 0 || phnum == 0 {
        return None;
    }
    // SAFETY: AT_PHDR and AT_PHNUM describe the executable's program headers,
    // which stay mapped (read-only) for the life of the process.
    let headers = unsafe { std::slice::from_raw_parts(phdr as *const libc::Elf64_Phdr, phnum) };
    let own = headers.iter().find(|h| h.p_type == libc::PT_PHDR)?;
    let base = phdr.checked_sub(usize::try_from(own.p_vaddr).ok()?)?;
    let dynamic = headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC)?;
    let entries = usize::try_from(dynamic.p_memsz).ok()? / 16;
    let first = base.checked_add(usize::try_from(dynamic.p_vaddr).ok()?)? as *const [u64; 2];
    let (mut rela, mut size) = (None, None);
    for index in 0..entries {
        // SAFETY: PT_DYNAMIC covers `entries` (tag, value) pairs, mapped for
        // the life of the process; the array ends at DT_NULL.
        let [tag, value] = unsafe { *first.add(index) };
        match tag {
            DT_NULL => break,
            DT_RELA => rela = usize::try_from(value).ok(),
            DT_RELASZ => size = usize::try_from(value).ok(),
            _ => {}
        }
    }
    let (rela, size) = (rela?, size?);
    // glibc rewrites some entries to absolute addresses while it loads.
    let start = if rela >= base {
        rela
    } else {
        base.checked_add(rela)?
    };
    let end = start.checked_add(size)?;
    let safe = headers.iter().any(|h| {
        let Ok(offset) = usize::try_from(h.p_vaddr) else {
            return false;
        };
        let Ok(file_size) = usize::try_from(h.p_filesz) else {
            return false;
        };
        let segment = base + offset;
        h.p_type == libc::PT_LOAD
            && h.p_flags & PF_W == 0
            && segment <= start
            && end <= segment + file_size
    });
    safe.then_some((start, size))
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub fn relocation_table() -> Option<(usize, usize)> {
    None
}

/// Unmaps the whole pages of the executable's relocation table; returns the
/// bytes released (0 where there is nothing to release or it is unsafe to).
pub fn release_relocation_table() -> usize {
    let Some((start, size)) = relocation_table() else {
        return 0;
    };
    release_pages(start, size)
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn release_pages(start: usize, size: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return 0,
    };
    let first = start.div_ceil(page) * page;
    let last = (start + size) / page * page;
    if last <= first {
        return 0;
    }
    // SAFETY: [first, last) lies in a read-only, file-backed segment of the
    // executable (checked by `relocation_table`): dropping its pages loses
    // nothing, and a later read faults them back in from the file.
    let released = unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_DONTNEED,
        )
    };
    if released == 0 { last - first } else { 0 }
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn release_pages(_start: usize, _size: usize) -> usize {
    0
}

/// Gives the heap's free pages back to the system (glibc's `malloc_trim`):
/// after a model's session is dropped or a load's scratch memory freed.
/// It walks every arena under that arena's lock, so it is for rare events,
/// never per request. Elsewhere (musl, other systems) it does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_freed_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed_heap() {}

/// How often [`keep_heap_small`] looks at the heap.
pub const HEAP_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Growth of the heap's slack that makes [`keep_heap_small`] trim it: a
/// large request's worth, more than the heap's ordinary churn.
pub const HEAP_GROWTH_TO_TRIM: u64 = 8 << 20;

/// Gives back, every [`HEAP_CHECK_INTERVAL`], what the heap kept of memory
/// freed since: when the heap's slack (anonymous memory the heap holds but
/// has not handed out, [`heap_slack`]) has grown by [`HEAP_GROWTH_TO_TRIM`]
/// over the lowest it was since the last trim, it trims the heap (on a
/// blocking thread: the trim takes each arena's lock in turn) and counts
/// from what is left. Memory in use (a model loaded, requests in flight) is
/// not slack, so a trim in the middle of a burst does not hide what the
/// burst frees after it. Runs until `shutdown`; does nothing where
/// [`release_freed_heap`] does nothing.
pub async fn keep_heap_small(shutdown: CancellationToken) {
    let Some(mut floor) = heap_slack() else {
        return;
    };
    let mut checks = tokio::time::interval(HEAP_CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = checks.tick() => {}
        }
        // A blocking thread: reading the heap's figures and trimming it
        // take each arena's lock in turn.
        match tokio::task::spawn_blocking(move || trim_if_grown(floor)).await {
            Ok(Some(lowest)) => floor = lowest,
            _ => return,
        }
    }
}

/// One look of [`keep_heap_small`]: trims the heap if its slack has grown by
/// [`HEAP_GROWTH_TO_TRIM`] over `floor`, and returns the floor to count from
/// next (None: the figures cannot be read here).
fn trim_if_grown(floor: u64) -> Option<u64> {
    let slack = heap_slack()?;
    if slack < floor.saturating_add(HEAP_GROWTH_TO_TRIM) {
        return Some(floor.min(slack));
    }
    release_freed_heap();
    let after = heap_slack()?;
    tracing::debug!(before = slack, after, "gave the heap's free memory back");
    Some(after)
}

/// Anonymous resident memory the heap holds but has not handed out, in
/// bytes: the process's `RssAnon` (heap, stacks) less what glibc counts in
/// use (`mallinfo2`: allocated from its arenas, and mapped on its own). The
/// stacks and the tops of threads' heaps, which `malloc_trim` leaves, are
/// in it too: [`keep_heap_small`] watches it grow, not its size.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_slack() -> Option<u64> {
    let anonymous = crate::telemetry::agent_anonymous_bytes()?;
    // SAFETY: mallinfo2 only reads glibc's arenas, under their locks.
    let heap = unsafe { libc::mallinfo2() };
    let in_use = u64::try_from(heap.uordblks.saturating_add(heap.hblkhd)).ok()?;
    Some(anonymous.saturating_sub(in_use))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_slack() -> Option<u64> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    /// Whether each page of [start, start + len) is mapped into this process
    /// (bit 63 of its /proc/self/pagemap entry).
    fn present_pages(start: usize, len: usize) -> Vec<bool> {
        let page = 4096;
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        (start / page..(start + len).div_ceil(page))
            .map(|index| {
                pagemap.seek(SeekFrom::Start(index as u64 * 8)).unwrap();
                let mut entry = [0u8; 8];
                pagemap.read_exact(&mut entry).unwrap();
                u64::from_le_bytes(entry) >> 63 == 1
            })
            .collect()
    }

    #[test]
    fn the_relocation_table_is_found_in_a_read_only_segment() {
        // Test binaries are position-independent too, with thousands of
        // relative relocations of 24 bytes each.
        let (start, size) = relocation_table().expect("a PIE test binary has a relocation table");
        assert!(start > 0);
        assert!(size >= 24 * 1000, "only {size} bytes of relocations");
        assert_eq!(size % 24, 0, "RELA entries are 24 bytes");
    }

    #[test]
    fn releasing_the_relocation_table_unmaps_its_pages_and_keeps_its_contents() {
        let (start, size) = relocation_table().unwrap();
        // SAFETY (test): the table is mapped and readable; read it once so
        // every page is resident, and keep a copy to compare.
        let before = unsafe { std::slice::from_raw_parts(start as *const u8, size) }.to_vec();
        let released = release_relocation_table();
        assert!(
            released >= size - 2 * 4096,
            "released {released} of {size} bytes"
        );
        let first_whole = start.div_ceil(4096) * 4096;
        let present = present_pages(first_whole, released);
        assert!(
            present.iter().all(|p| !p),
            "{} of {} released pages are still mapped",
            present.iter().filter(|p| **p).count(),
            present.len()
        );
        // Reading it again pages it back in from the file, unchanged.
        // SAFETY (test): as above; the pages fault back in from the file.
        let after = unsafe { std::slice::from_raw_parts(start as *const u8, size) };
        assert_eq!(after, &before[..]);
    }
}
