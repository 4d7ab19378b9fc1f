//! The on-disk store-and-forward queue of telemetry batches.
//!
//! Every batch is written here before it is sent and deleted only when the
//! control plane acknowledges it, so telemetry survives disconnects, agent
//! restarts and crashes.
//!
//! Layout of the directory:
//! - `00000000000000000042.batch`: one batch, named by its sequence number
//!   (20 digits, so names sort like numbers). Contents: the 8-byte magic
//!   `EFTBATv1`, the payload length (u64, little-endian), the SHA-256 of the
//!   payload, then the payload: the protobuf-encoded `TelemetryBatch`.
//! - `state`: the highest sequence ever assigned and the number of batches
//!   dropped, as text; replaced atomically.
//! - `.tmp-*`: a write in progress; left over only by a crash, deleted at open.
//! - `lock`: held (advisory lock) while an `Outbox` is open, so two agents
//!   cannot share one directory.
//!
//! Guarantees:
//! - Sequence numbers start at 1 and strictly increase; none is ever reused,
//!   also across restarts and crashes: the counter is made durable before the
//!   batch is written, and the next number is above both the counter and
//!   every file's number. (A crash can leave a gap, never a repeat.)
//! - A queue that finds its state missing or invalid at open (new, wiped,
//!   damaged) marks itself durably: the batches it queues until the next
//!   Welcome are renumbered past what the control plane has stored, if need
//!   be (see [`Outbox::ack`]), never deleted unsent.
//! - A file is written to a temp name, fsynced, renamed into place and the
//!   directory fsynced: a batch file is complete or absent. A file that still
//!   fails its length or checksum (disk corruption) is logged, deleted and
//!   counted as dropped; it never causes a panic or an error for the caller.
//! - The queue holds at most `cap_bytes` (or just the newest batch, if that
//!   alone is bigger): the oldest batches make room and are counted in a
//!   persisted `dropped_batches_total`, stamped into every later batch, and
//!   the batch that caused the drop carries a `TELEMETRY_DROPPED` event.
//!   They are dropped only once the new batch is written, so a write that
//!   fails (a full disk) drops nothing; during a push the directory holds
//!   up to one batch more than the cap (and keeps it if a crash comes in
//!   between: the next push makes room again).
//!
//! All I/O is blocking `std::fs`: call it from `spawn_blocking` (or a
//! dedicated thread) in async code. Methods take `&mut self`; share an
//! `Outbox` behind a `Mutex`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use edgefleet_proto::edgefleet::v1::{Event, TelemetryBatch, event};
use prost::Message;
use sha2::{Digest, Sha256};

use super::recorder::unix_ms;

/// Default cap of the queue on disk.
pub const DEFAULT_OUTBOX_CAP_BYTES: u64 = 64 * 1024 * 1024;

const MAGIC: &[u8; 8] = b"EFTBATv1";
const HEADER_LEN: usize = 8 + 8 + 32;
const STATE_FILE: &str = "state";
const STATE_HEADER: &str = "edgefleet telemetry outbox v1";
const LOCK_FILE: &str = "lock";
const TMP_PREFIX: &str = ".tmp-";
const BATCH_SUFFIX: &str = ".batch";
const SEQUENCE_DIGITS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("telemetry queue: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "telemetry queue {} is in use by another process (its lock file is held)",
        .0.display()
    )]
    Locked(PathBuf),
    #[error("telemetry queue: sequence numbers are exhausted")]
    SequenceExhausted,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError {
    let path = path.to_path_buf();
    move |source| OutboxError::Io {
        action,
        path,
        source,
    }
}

/// The persisted counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    last_sequence: u64,
    dropped_total: u64,
    /// Waiting batches numbered above `renumber_after` and at or below this
    /// were queued after the queue lost its state, and are being renumbered
    /// past the control plane's ack (0: none). Durable, so that an
    /// interrupted renumbering is finished, never taken for acknowledged
    /// batches and deleted.
    renumber_through: u64,
    /// See `renumber_through`: batches at or below this one are not
    /// renumbered (they were numbered before the state was lost).
    renumber_after: u64,
    /// The queue found its state missing or invalid when it was opened, and
    /// has not yet learned (from a Welcome's ack) how far the control plane
    /// has stored its batches: batches numbered above this one (the highest
    /// found on disk then) were numbered without knowing it, and may carry
    /// numbers the control plane has stored already.
    unverified_after: Option<u64>,
}

impl State {
    fn encode(&self) -> String {
        let mut text = format!(
            "{STATE_HEADER}\nlast_sequence={}\ndropped_batches_total={}\nrenumber_through={}\n",
            self.last_sequence, self.dropped_total, self.renumber_through
        );
        if self.renumber_after > 0 {
            text.push_str(&format!("renumber_after={}\n", self.renumber_after));
        }
        if let Some(after) = self.unverified_after {
            text.push_str(&format!("unverified_after={after}\n"));
        }
        text
    }

    fn decode(text: &str) -> Result<State, String> {
        let mut lines = text.lines();
        if lines.next() != Some(STATE_HEADER) {
            return Err("unknown header".into());
        }
        let mut last_sequence = None;
        let mut dropped_total = None;
        let mut renumber_through = 0;
        let mut renumber_after = 0;
        let mut unverified_after = None;
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("malformed line '{line}'"));
            };
            let value: u64 = value
                .parse()
                .map_err(|_| format!("'{key}' is not a number"))?;
            match key {
                "last_sequence" => last_sequence = Some(value),
                "dropped_batches_total" => dropped_total = Some(value),
                "renumber_through" => renumber_through = value,
                "renumber_after" => renumber_after = value,
                "unverified_after" => unverified_after = Some(value),
                _ => {}
            }
        }
        Ok(State {
            last_sequence: last_sequence.ok_or("no last_sequence")?,
            dropped_total: dropped_total.ok_or("no dropped_batches_total")?,
            renumber_through,
            renumber_after,
            unverified_after,
        })
    }
}

/// Why a batch file cannot be used.
enum ReadFailure {
    Missing,
    Corrupt(String),
    Io(std::io::Error),
}

/// The on-disk telemetry queue. See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    cap_bytes: u64,
    state: State,
    /// Sequence → file size, of every batch on disk.
    files: BTreeMap<u64, u64>,
    bytes: u64,
    /// Held for the lifetime of the outbox.
    _lock: File,
    /// Tests: how many more state saves succeed (`None`: all).
    #[cfg(test)]
    state_saves_left: Option<usize>,
}

fn batch_file_name(sequence: u64) -> String {
    format!("{sequence:0width$}{BATCH_SUFFIX}", width = SEQUENCE_DIGITS)
}

fn parse_batch_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(BATCH_SUFFIX)?;
    if digits.len() != SEQUENCE_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&seq| seq > 0)
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

/// Writes `bytes` to `dir/name` atomically and durably.
fn write_atomically(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<(), OutboxError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    let target = dir.join(name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        for part in parts {
            file.write_all(part).map_err(io_error("write", &tmp))?;
        }
        file.sync_all().map_err(io_error("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &target).map_err(io_error("rename into place", &target))?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

impl Outbox {
    /// Opens (creating it if needed) the queue in `dir`, holding at most
    /// `cap_bytes`. Deletes leftover temp files and batch files that are
    /// truncated or not batches (counting them as dropped).
    pub fn open(dir: impl Into<PathBuf>, cap_bytes: u64) -> Result<Outbox, OutboxError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(OutboxError::Locked(dir)),
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(io_error("lock", &lock_path)(err));
            }
        }

        let state_path = dir.join(STATE_FILE);
        let saved = match std::fs::read_to_string(&state_path) {
            Ok(text) => State::decode(&text)
                .inspect_err(|reason| {
                    // Only a damaged disk or a person can cause this (the file
                    // is replaced atomically). Recover from the batch files;
                    // the control plane's acked sequence (see `ack`) lifts the
                    // counter above anything it has stored.
                    tracing::error!(path = %state_path.display(), %reason, "the telemetry queue's state file is invalid; recovering from the batch files");
                })
                .ok(),
            Err(err) if err.kind() == ErrorKind::NotFound => None,
            Err(err) => return Err(io_error("read", &state_path)(err)),
        };
        let mut state = saved.unwrap_or_default();

        let mut files = BTreeMap::new();
        let mut dropped = 0u64;
        let entries = std::fs::read_dir(&dir).map_err(io_error("list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error("list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) {
                tracing::info!(path = %path.display(), "deleting an unfinished telemetry write");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(sequence) = parse_batch_file_name(&name) else {
                if name != STATE_FILE && name != LOCK_FILE {
                    tracing::warn!(path = %path.display(), "ignoring an unknown file in the telemetry queue");
                }
                continue;
            };
            state.last_sequence = state.last_sequence.max(sequence);
            match check_header(&path) {
                Ok(size) => {
                    files.insert(sequence, size);
                }
                Err(reason) => {
                    tracing::error!(path = %path.display(), %reason, "dropping a damaged telemetry batch");
                    let _ = std::fs::remove_file(&path);
                    dropped += 1;
                }
            }
        }
        state.dropped_total = state.dropped_total.saturating_add(dropped);
        if saved.is_none() {
            // New, or its state lost (wiped, damaged): the batches queued
            // from now on are numbered without knowing how far the control
            // plane has stored this device's. Marked durably (the state is
            // written below), so the first Welcome's ack renumbers them if
            // need be, also after a restart in between (see `ack`).
            state.unverified_after = Some(state.last_sequence);
            if !files.is_empty() {
                tracing::warn!(
                    dir = %dir.display(),
                    waiting = files.len(),
                    last = state.last_sequence,
                    "the telemetry queue has lost its state; batches queued from now on are checked against the control plane's at the next connect"
                );
            }
        }
        let bytes = files.values().sum();
        let mut outbox = Outbox {
            dir,
            cap_bytes,
            state,
            files,
            bytes,
            _lock: lock,
            #[cfg(test)]
            state_saves_left: None,
        };
        // Written only if it changed: a full disk or a file system remounted
        // read-only must not keep the agent from starting.
        if saved != Some(outbox.state) {
            outbox.save_state(outbox.state)?;
        }
        Ok(outbox)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cap_bytes(&self) -> u64 {
        self.cap_bytes
    }

    /// The highest sequence number ever assigned (0: none yet). What a
    /// session's Hello reports as `last_sequence`.
    pub fn last_sequence(&self) -> u64 {
        self.state.last_sequence
    }

    /// Batches dropped since the queue was created (cap and damage).
    pub fn dropped_total(&self) -> u64 {
        self.state.dropped_total
    }

    /// Batches waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Bytes on disk of the waiting batches.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Sequence numbers of the waiting batches, oldest first.
    pub fn pending_sequences(&self) -> Vec<u64> {
        self.files.keys().copied().collect()
    }

    /// The number the next batch gets: above every number assigned (the
    /// counter) and every batch on disk, whether or not the counter could be
    /// saved since.
    fn next_sequence(&self) -> Result<u64, OutboxError> {
        let highest_file = self.files.keys().next_back().copied().unwrap_or(0);
        self.state
            .last_sequence
            .max(highest_file)
            .checked_add(1)
            .ok_or(OutboxError::SequenceExhausted)
    }

    fn save_state(&mut self, state: State) -> Result<(), OutboxError> {
        #[cfg(test)]
        if let Some(left) = &mut self.state_saves_left {
            if *left == 0 {
                return Err(io_error("write", &self.dir.join(STATE_FILE))(
                    std::io::Error::other("no space left (test)"),
                ));
            }
            *left -= 1;
        }
        write_atomically(&self.dir, STATE_FILE, &[state.encode().as_bytes()])?;
        self.state = state;
        Ok(())
    }

    /// Stores a batch and returns its sequence number. Sets the batch's
    /// `sequence` and `dropped_batches_total` (whatever they held is
    /// replaced); makes room by dropping the oldest batches if the cap
    /// requires it, once the new batch is on disk. On an error the batch is
    /// not queued (its sequence number may be skipped, never reused) and
    /// nothing was dropped for it.
    pub fn push(&mut self, mut batch: TelemetryBatch) -> Result<u64, OutboxError> {
        let sequence = self.next_sequence()?;
        batch.sequence = sequence;

        // Oldest batches to drop so the new one fits.
        let mut to_drop: Vec<u64> = Vec::new();
        let mut kept_bytes = self.bytes;
        let mut oldest = self.files.iter();
        let mut drop_event: Option<usize> = None;
        loop {
            batch.dropped_batches_total = self
                .state
                .dropped_total
                .saturating_add(to_drop.len() as u64);
            if let (Some(index), Some(first), Some(last)) =
                (drop_event, to_drop.first(), to_drop.last())
            {
                batch.events[index].message = format!(
                    "the telemetry queue dropped {} unacknowledged batch(es), sequences {first}..={last}, \
                     to stay under its cap of {} bytes ({} dropped in total)",
                    to_drop.len(),
                    self.cap_bytes,
                    batch.dropped_batches_total
                );
            }
            let size = (HEADER_LEN + batch.encoded_len()) as u64;
            if kept_bytes.saturating_add(size) <= self.cap_bytes {
                break;
            }
            let Some((&old, &old_size)) = oldest.next() else {
                break; // Only this batch is left: it is kept even if bigger.
            };
            to_drop.push(old);
            kept_bytes -= old_size;
            if drop_event.is_none() {
                batch.events.push(Event {
                    unix_ms: unix_ms(SystemTime::now()),
                    kind: event::Kind::TelemetryDropped as i32,
                    model: String::new(),
                    version: 0,
                    message: String::new(),
                });
                drop_event = Some(batch.events.len() - 1);
            }
        }

        // The sequence becomes durable before the batch is written: a crash
        // from here on can skip it, never reuse it.
        self.save_state(State {
            last_sequence: sequence,
            ..self.state
        })?;
        // The new batch is written before any old one is dropped: if it
        // cannot be (a full disk), nothing was dropped for it. Meanwhile the
        // queue holds one batch over its cap.
        self.write_batch(&batch)?;
        if to_drop.is_empty() {
            return Ok(sequence);
        }
        // The drops are counted durably before they happen: a crash from
        // here on can over-count them, never hide one.
        if let Err(err) = self.save_state(State {
            dropped_total: batch.dropped_batches_total,
            ..self.state
        }) {
            // The batch is queued all the same; the old ones stay until a
            // later push makes room (the new batch's count claims them).
            tracing::warn!(error = %err, "cannot count the telemetry batches to drop; keeping them over the cap for now");
            return Ok(sequence);
        }
        tracing::warn!(
            dropped = to_drop.len(),
            total = batch.dropped_batches_total,
            cap_bytes = self.cap_bytes,
            "telemetry queue full: dropped the oldest batches"
        );
        for old in to_drop {
            self.remove(old);
        }
        Ok(sequence)
    }

    /// Writes a batch's file under its sequence and counts it as waiting.
    fn write_batch(&mut self, batch: &TelemetryBatch) -> Result<(), OutboxError> {
        let payload = batch.encode_to_vec();
        let length = (payload.len() as u64).to_le_bytes();
        let digest = Sha256::digest(&payload);
        let name = batch_file_name(batch.sequence);
        write_atomically(&self.dir, &name, &[MAGIC, &length, &digest, &payload])?;
        let size = (HEADER_LEN + payload.len()) as u64;
        self.files.insert(batch.sequence, size);
        self.bytes += size;
        Ok(())
    }

    fn remove(&mut self, sequence: u64) {
        if let Some(size) = self.files.remove(&sequence) {
            self.bytes -= size;
        }
        let path = self.dir.join(batch_file_name(sequence));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot delete a telemetry batch");
            }
        }
    }

    /// Deletes every waiting batch and starts the numbering again at 1, for
    /// a new device identity (the state dir enrolled again): what the old
    /// device queued must never be uploaded as the new device's, and the
    /// new device has nothing stored anywhere. Returns how many batches were
    /// deleted. Every file is gone (and the directory synced) before the
    /// counter is reset, so a crash midway leaves old batches only under the
    /// old numbering, which the caller has not replaced yet.
    pub fn discard_all(&mut self) -> Result<usize, OutboxError> {
        let sequences: Vec<u64> = self.files.keys().copied().collect();
        for &sequence in &sequences {
            let path = self.dir.join(batch_file_name(sequence));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => return Err(io_error("delete", &path)(err)),
            }
            if let Some(size) = self.files.remove(&sequence) {
                self.bytes -= size;
            }
        }
        sync_dir(&self.dir)?;
        self.save_state(State::default())?;
        Ok(sequences.len())
    }

    /// Reads one waiting batch. `None` if it is not waiting, or if its file
    /// turned out damaged or cannot be read (then it is deleted and counted
    /// as dropped: a batch that cannot be read must not hold up the ones
    /// after it, nor the session that sends them, for ever).
    pub fn read(&mut self, sequence: u64) -> Result<Option<TelemetryBatch>, OutboxError> {
        if !self.files.contains_key(&sequence) {
            return Ok(None);
        }
        let path = self.dir.join(batch_file_name(sequence));
        // A second try before giving the batch up; an error that passes
        // with time (no file descriptor or memory left) keeps the batch.
        let read = match read_batch(&path, sequence) {
            Err(ReadFailure::Io(_)) => read_batch(&path, sequence),
            read => read,
        };
        match read {
            Ok(batch) => Ok(Some(batch)),
            Err(ReadFailure::Missing) => {
                tracing::warn!(path = %path.display(), "a telemetry batch disappeared from disk");
                self.remove(sequence);
                Ok(None)
            }
            Err(ReadFailure::Corrupt(reason)) => self.drop_unreadable(sequence, &path, &reason),
            Err(ReadFailure::Io(err)) if is_passing(&err) => Err(io_error("read", &path)(err)),
            Err(ReadFailure::Io(err)) => self.drop_unreadable(sequence, &path, &err.to_string()),
        }
    }

    fn drop_unreadable(
        &mut self,
        sequence: u64,
        path: &Path,
        reason: &str,
    ) -> Result<Option<TelemetryBatch>, OutboxError> {
        tracing::error!(path = %path.display(), %reason, "dropping a damaged or unreadable telemetry batch");
        self.remove(sequence);
        let state = State {
            dropped_total: self.state.dropped_total.saturating_add(1),
            ..self.state
        };
        self.save_state(state)?;
        Ok(None)
    }

    /// Up to `max` waiting batches with a sequence above `after`, oldest
    /// first. To send the backlog in order without loading it all, call it
    /// repeatedly with `after` = the last sequence sent.
    pub fn pending_after(
        &mut self,
        after: u64,
        max: usize,
    ) -> Result<Vec<TelemetryBatch>, OutboxError> {
        let mut batches = Vec::new();
        let sequences: Vec<u64> = self
            .files
            .range(after.saturating_add(1)..)
            .map(|(&seq, _)| seq)
            .collect();
        for sequence in sequences {
            if batches.len() >= max {
                break;
            }
            if let Some(batch) = self.read(sequence)? {
                batches.push(batch);
            }
        }
        Ok(batches)
    }

    /// Every waiting batch, oldest first (loads them all: prefer
    /// [`pending_after`](Self::pending_after) for a large backlog).
    pub fn pending(&mut self) -> Result<Vec<TelemetryBatch>, OutboxError> {
        self.pending_after(0, usize::MAX)
    }

    /// The control plane has stored every batch up to `sequence`
    /// (cumulative): deletes them, and returns how many were deleted. Call
    /// it with `Welcome.acked_sequence` before sending on a new session.
    ///
    /// The counter never stays below `sequence`, so new batches are not
    /// taken for stored ones. Batches numbered without knowing what the
    /// control plane has stored are renumbered after `sequence` and every
    /// number assigned, in order, before anything is deleted (the control
    /// plane would take them for the stored batches of the same numbers, and
    /// this call would delete them unsent):
    /// - after the queue found its state missing or invalid at open, the
    ///   batches queued since: the first call (the Welcome's; the mark that
    ///   says so survives restarts) renumbers them if the control plane has
    ///   stored anything above the highest batch that was on disk then.
    ///   Those older batches keep their numbers: the control plane may have
    ///   stored them, and renumbered they would be stored twice;
    /// - when `sequence` is above every number assigned (a state restored
    ///   from an old copy), every waiting batch.
    ///
    /// A renumbering cut short (a crash, a full disk) is finished by the
    /// next call, before anything is deleted.
    pub fn ack(&mut self, sequence: u64) -> Result<usize, OutboxError> {
        if let Some(before) = self.state.unverified_after {
            let queued_since = self
                .files
                .keys()
                .next_back()
                .copied()
                .filter(|&last| last > before);
            let mut next = State {
                unverified_after: None,
                last_sequence: self.state.last_sequence.max(sequence),
                ..self.state
            };
            if let Some(through) = queued_since
                && sequence > before
            {
                tracing::warn!(
                    acked = sequence,
                    queued_since = self.files.range(before.saturating_add(1)..).count(),
                    "the telemetry queue lost its state and the control plane has stored \
                     batches numbered like the ones queued since; numbering those after them"
                );
                next.renumber_after = before;
                next.renumber_through = through;
            }
            self.save_state(next)?;
        } else if sequence > self.state.last_sequence {
            let through = self.files.keys().next_back().copied().unwrap_or(0);
            tracing::warn!(
                acked = sequence,
                last = self.state.last_sequence,
                waiting = self.files.len(),
                "the control plane acknowledged sequences this queue never assigned (its state was lost); \
                 numbering the waiting batches after them"
            );
            self.save_state(State {
                last_sequence: sequence,
                renumber_after: 0,
                renumber_through: through,
                ..self.state
            })?;
        }
        if self.state.renumber_through > 0 {
            self.finish_renumbering()?;
        }
        let acked: Vec<u64> = self.files.range(..=sequence).map(|(&s, _)| s).collect();
        for &s in &acked {
            self.remove(s);
        }
        Ok(acked.len())
    }

    /// Gives each waiting batch numbered above `renumber_after` and at or
    /// below `renumber_through` the next number, in order, by renaming its
    /// file (a batch's number is its file's name): at any point each batch
    /// is under one name, and the counter, taken as the highest of the
    /// state's and the names' (at open, and for every new number), never
    /// goes back. It moves in memory before it is saved: a save that fails
    /// must not let a later push take the number a batch was renamed to.
    fn finish_renumbering(&mut self) -> Result<(), OutboxError> {
        let from = self.state.renumber_after.saturating_add(1);
        let through = self.state.renumber_through;
        let waiting: Vec<(u64, u64)> = if from <= through {
            self.files
                .range(from..=through)
                .map(|(&sequence, &size)| (sequence, size))
                .collect()
        } else {
            Vec::new()
        };
        for (old, size) in waiting {
            let new = self.next_sequence()?;
            let path = self.dir.join(batch_file_name(old));
            std::fs::rename(&path, self.dir.join(batch_file_name(new)))
                .map_err(io_error("rename", &path))?;
            self.files.remove(&old);
            self.files.insert(new, size);
            self.state.last_sequence = new;
            sync_dir(&self.dir)?;
            self.save_state(self.state)?;
        }
        self.save_state(State {
            renumber_after: 0,
            renumber_through: 0,
            ..self.state
        })
    }
}

/// Whether a read error is the process's or the system's for the moment
/// (out of file descriptors or memory, interrupted), not the file's.
fn is_passing(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::OutOfMemory
    ) || matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR)
    )
}

/// Checks a batch file's header against its size; returns the size.
fn check_header(path: &Path) -> Result<u64, String> {
    let mut file = File::open(path).map_err(|err| err.to_string())?;
    let size = file.metadata().map_err(|err| err.to_string())?.len();
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header)
        .map_err(|_| format!("only {size} bytes, shorter than the header"))?;
    if &header[..8] != MAGIC {
        return Err("not a telemetry batch file (wrong magic)".into());
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[8..16]);
    let length = u64::from_le_bytes(length);
    if (HEADER_LEN as u64).checked_add(length) != Some(size) {
        return Err(format!(
            "truncated or padded: header says {length} payload bytes, file has {}",
            size.saturating_sub(HEADER_LEN as u64)
        ));
    }
    Ok(size)
}

fn read_batch(path: &Path, sequence: u64) -> Result<TelemetryBatch, ReadFailure> {
    let bytes = std::fs::read(path).map_err(|err| match err.kind() {
        ErrorKind::NotFound => ReadFailure::Missing,
        _ => ReadFailure::Io(err),
    })?;
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(ReadFailure::Corrupt("bad header".into()));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[8..16]);
    if u64::from_le_bytes(length) != payload.len() as u64 {
        return Err(ReadFailure::Corrupt("length mismatch".into()));
    }
    if Sha256::digest(payload)[..] != header[16..] {
        return Err(ReadFailure::Corrupt("checksum mismatch".into()));
    }
    let mut batch = TelemetryBatch::decode(payload)
        .map_err(|err| ReadFailure::Corrupt(format!("not a TelemetryBatch: {err}")))?;
    // The file's name is the batch's number: a renumbering renames the file
    // and leaves the payload (its checksum above) as it was written.
    batch.sequence = sequence;
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::edgefleet::v1::DeviceTelemetry;

    fn batch(start: u64) -> TelemetryBatch {
        TelemetryBatch {
            device_id: "dev-1".into(),
            start_unix_ms: start,
            end_unix_ms: start + 10_000,
            device: Some(DeviceTelemetry {
                runtime: "tract".into(),
                ..DeviceTelemetry::default()
            }),
            // Some bulk, so the cap test drops whole batches, not events.
            events: vec![Event {
                kind: event::Kind::Error as i32,
                message: "x".repeat(1000),
                ..Event::default()
            }],
            ..TelemetryBatch::default()
        }
    }

    /// A new queue, past the first Welcome of a new device (the control
    /// plane has stored nothing): its numbering is verified.
    fn open_verified(dir: &Path, cap: u64) -> Outbox {
        let mut outbox = Outbox::open(dir, cap).unwrap();
        assert_eq!(outbox.ack(0).unwrap(), 0);
        outbox
    }

    fn starts(batches: &[TelemetryBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.start_unix_ms).collect()
    }

    fn seqs(batches: &[TelemetryBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.sequence).collect()
    }

    #[test]
    fn sequences_start_at_one_and_continue_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut outbox = open_verified(dir.path(), DEFAULT_OUTBOX_CAP_BYTES);
            assert_eq!(outbox.last_sequence(), 0);
            assert_eq!(outbox.push(batch(1)).unwrap(), 1);
            assert_eq!(outbox.push(batch(2)).unwrap(), 2);
            assert_eq!(outbox.push(batch(3)).unwrap(), 3);
            // Everything acked: no file left, the counter must still hold.
            assert_eq!(outbox.ack(3).unwrap(), 3);
            assert!(outbox.is_empty());
        }
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 3);
        assert_eq!(outbox.push(batch(4)).unwrap(), 4);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 4);
        assert_eq!(outbox.pending_sequences(), vec![4]);
    }

    #[test]
    fn the_higher_of_state_and_file_names_wins() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
            for i in 0..3 {
                outbox.push(batch(i)).unwrap();
            }
        }
        // A state file from before the last write (as if lost).
        std::fs::write(
            dir.path().join(STATE_FILE),
            State {
                last_sequence: 1,
                ..State::default()
            }
            .encode(),
        )
        .unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 3);
        assert_eq!(outbox.push(batch(9)).unwrap(), 4);
    }

    #[test]
    fn batches_come_back_in_order_and_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        for i in 0..12 {
            outbox.push(batch(100 + i)).unwrap();
        }
        let all = outbox.pending().unwrap();
        assert_eq!(seqs(&all), (1..=12).collect::<Vec<_>>());
        assert_eq!(starts(&all), (100..112).collect::<Vec<_>>());
        assert_eq!(all[0].device_id, "dev-1");

        let mut sent = Vec::new();
        let mut cursor = 0;
        loop {
            let chunk = outbox.pending_after(cursor, 5).unwrap();
            let Some(last) = chunk.last() else { break };
            assert!(chunk.len() <= 5);
            cursor = last.sequence;
            sent.extend(seqs(&chunk));
        }
        assert_eq!(sent, (1..=12).collect::<Vec<_>>());
    }

    #[test]
    fn ack_deletes_up_to_and_including_the_sequence_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open_verified(dir.path(), DEFAULT_OUTBOX_CAP_BYTES);
        for i in 0..5 {
            outbox.push(batch(i)).unwrap();
        }
        let bytes_before = outbox.bytes();
        assert_eq!(outbox.ack(3).unwrap(), 3);
        assert_eq!(outbox.pending_sequences(), vec![4, 5]);
        assert!(outbox.bytes() < bytes_before);
        assert_eq!(seqs(&outbox.pending().unwrap()), vec![4, 5]);
        // Acking again or lower is harmless.
        assert_eq!(outbox.ack(2).unwrap(), 0);
        assert_eq!(outbox.ack(3).unwrap(), 0);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.pending_sequences(), vec![4, 5]);
        let files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".batch")
            })
            .count();
        assert_eq!(files, 2);
    }

    /// The queue lost its state and files (the directory wiped), numbered
    /// two batches 1 and 2 while offline, then learns the control plane has
    /// stored up to 500: those two were never sent, so they are kept, as 501
    /// and 502, in order, and the next batch is 503.
    #[test]
    fn an_ack_beyond_what_was_assigned_renumbers_the_waiting_batches_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        outbox.push(batch(10)).unwrap();
        outbox.push(batch(20)).unwrap();
        assert_eq!(outbox.ack(500).unwrap(), 0);
        assert_eq!(outbox.last_sequence(), 502);
        let waiting = outbox.pending().unwrap();
        assert_eq!(seqs(&waiting), vec![501, 502]);
        assert_eq!(starts(&waiting), vec![10, 20]);
        assert_eq!(outbox.push(batch(30)).unwrap(), 503);
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 503);
        assert_eq!(starts(&outbox.pending().unwrap()), vec![10, 20, 30]);
        assert_eq!(outbox.ack(502).unwrap(), 2);
        assert_eq!(outbox.pending_sequences(), vec![503]);
    }

    /// A renumbering cut short by a crash, right after it renamed the first
    /// of two batches: the next ack (the same one, at the next Welcome)
    /// finishes it instead of deleting the batch still under its old
    /// number as acknowledged.
    #[test]
    fn an_interrupted_renumbering_is_finished_not_taken_for_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        outbox.push(batch(10)).unwrap();
        outbox.push(batch(20)).unwrap();
        drop(outbox);
        // The state saved as the renumbering began, then batch 1 renamed to
        // 501, then the crash.
        let state = State {
            last_sequence: 500,
            renumber_through: 2,
            ..State::default()
        };
        std::fs::write(dir.path().join(STATE_FILE), state.encode()).unwrap();
        std::fs::rename(
            dir.path().join(batch_file_name(1)),
            dir.path().join(batch_file_name(501)),
        )
        .unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 501);
        assert_eq!(outbox.ack(500).unwrap(), 0);
        let waiting = outbox.pending().unwrap();
        assert_eq!(seqs(&waiting), vec![501, 502]);
        assert_eq!(starts(&waiting), vec![10, 20]);
        assert_eq!(outbox.push(batch(30)).unwrap(), 503);
        drop(outbox);
        let state = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(State::decode(&state).unwrap().renumber_through, 0);
    }

    /// A batch whose file cannot be read (here a directory stands where the
    /// file was) is given up and counted, and the batches after it are
    /// read: it does not stop the queue, and the session sending it, for
    /// ever.
    #[test]
    fn a_batch_that_cannot_be_read_is_dropped_and_the_rest_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        for i in 1..=3 {
            outbox.push(batch(i)).unwrap();
        }
        let path = dir.path().join(batch_file_name(2));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let read = outbox.pending().unwrap();
        assert_eq!(seqs(&read), vec![1, 3]);
        assert_eq!(outbox.dropped_total(), 1);
        assert_eq!(outbox.pending_sequences(), vec![1, 3]);
    }

    /// Opening a queue whose state is current does not write it again: an
    /// agent on a full disk, or on a file system remounted read-only, still
    /// starts.
    #[cfg(unix)]
    #[test]
    fn opening_does_not_rewrite_a_current_state() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        outbox.push(batch(1)).unwrap();
        drop(outbox);
        let inode = || {
            std::fs::metadata(dir.path().join(STATE_FILE))
                .unwrap()
                .ino()
        };
        let before = inode();
        let outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 1);
        assert_eq!(inode(), before, "the state file was replaced");
    }

    #[test]
    fn the_cap_drops_the_oldest_counts_them_and_stamps_later_batches() {
        let dir = tempfile::tempdir().unwrap();
        let one = (HEADER_LEN + {
            let mut b = batch(0);
            b.sequence = 1;
            b.encoded_len()
        }) as u64;
        // Room for three batches (plus a little).
        let cap = one * 3 + one / 2;
        let mut outbox = open_verified(dir.path(), cap);
        for i in 0..3 {
            outbox.push(batch(i)).unwrap();
        }
        assert_eq!(outbox.dropped_total(), 0);
        let seq = outbox.push(batch(3)).unwrap();
        assert_eq!(seq, 4);
        assert!(outbox.bytes() <= cap);
        let dropped = outbox.dropped_total();
        assert_eq!(dropped, 1);
        let pending = outbox.pending().unwrap();
        assert_eq!(*seqs(&pending).last().unwrap(), 4);
        assert_eq!(seqs(&pending)[0], 1 + dropped);
        let newest = pending.last().unwrap();
        assert_eq!(newest.dropped_batches_total, dropped);
        let event = newest
            .events
            .iter()
            .find(|e| e.kind == event::Kind::TelemetryDropped as i32)
            .expect("a TELEMETRY_DROPPED event");
        assert!(
            event.message.contains("sequences 1..="),
            "{}",
            event.message
        );
        assert!(
            pending[..pending.len() - 1]
                .iter()
                .all(|b| b.dropped_batches_total == 0)
        );
        drop(outbox);

        // Persisted: stamped into batches written after a restart too.
        let mut outbox = Outbox::open(dir.path(), cap).unwrap();
        assert_eq!(outbox.dropped_total(), dropped);
        let last = outbox.last_sequence();
        outbox.ack(last).unwrap();
        let seq = outbox.push(batch(10)).unwrap();
        let b = outbox.read(seq).unwrap().unwrap();
        assert_eq!(b.dropped_batches_total, dropped);
        assert!(
            b.events
                .iter()
                .all(|e| e.kind != event::Kind::TelemetryDropped as i32)
        );
    }

    /// At the cap, a batch that cannot be written (a full disk; here a
    /// directory stands where its file goes) drops nothing: the oldest
    /// batch is dropped only once the new one is on disk.
    #[test]
    fn a_batch_that_cannot_be_written_drops_nothing_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let one = (HEADER_LEN + {
            let mut b = batch(0);
            b.sequence = 1;
            b.encoded_len()
        }) as u64;
        let cap = one * 3 + one / 2;
        let mut outbox = Outbox::open(dir.path(), cap).unwrap();
        for i in 0..3 {
            outbox.push(batch(i)).unwrap();
        }
        let in_the_way = dir.path().join(batch_file_name(4));
        std::fs::create_dir(&in_the_way).unwrap();
        assert!(outbox.push(batch(3)).is_err());
        assert_eq!(outbox.pending_sequences(), vec![1, 2, 3]);
        assert_eq!(starts(&outbox.pending().unwrap()), vec![0, 1, 2]);
        assert_eq!(outbox.dropped_total(), 0);
        assert!(outbox.bytes() <= cap);

        // Once it can be written, the push drops the oldest as usual (4 was
        // skipped, never reused).
        std::fs::remove_dir(&in_the_way).unwrap();
        assert_eq!(outbox.push(batch(3)).unwrap(), 5);
        assert_eq!(outbox.pending_sequences(), vec![2, 3, 5]);
        assert_eq!(outbox.dropped_total(), 1);
        assert!(outbox.bytes() <= cap);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), cap).unwrap();
        assert_eq!(outbox.pending_sequences(), vec![2, 3, 5]);
        assert_eq!(outbox.dropped_total(), 1);
        assert!(outbox.bytes() <= cap);
    }

    #[test]
    fn a_batch_bigger_than_the_cap_is_kept_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 10).unwrap();
        outbox.push(batch(1)).unwrap();
        outbox.push(batch(2)).unwrap();
        assert_eq!(outbox.pending_sequences(), vec![2]);
        assert_eq!(outbox.dropped_total(), 1);
    }

    #[test]
    fn crash_leftovers_are_cleaned_up_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
            for i in 0..4 {
                outbox.push(batch(i)).unwrap();
            }
        }
        let path = |seq: u64| dir.path().join(batch_file_name(seq));
        // A write interrupted before its rename.
        std::fs::write(
            dir.path()
                .join(format!("{TMP_PREFIX}{}", batch_file_name(5))),
            b"EFTBATv1\x05",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{TMP_PREFIX}{STATE_FILE}")),
            b"edge",
        )
        .unwrap();
        // A truncated batch (as after a torn write on a lying disk).
        let full = std::fs::read(path(2)).unwrap();
        std::fs::write(path(2), &full[..full.len() - 3]).unwrap();
        // A batch with a flipped payload byte: passes the size check at
        // open, fails its checksum when read.
        let mut flipped = std::fs::read(path(3)).unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        std::fs::write(path(3), flipped).unwrap();
        // Garbage under a batch name, and an empty one.
        std::fs::write(path(7), b"garbage").unwrap();
        std::fs::write(path(6), b"").unwrap();

        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        // Numbers seen on disk are never reused, even of damaged files.
        assert_eq!(outbox.last_sequence(), 7);
        // Truncated, garbage and empty are dropped at open.
        assert_eq!(outbox.dropped_total(), 3);
        assert_eq!(outbox.pending_sequences(), vec![1, 3, 4]);
        let pending = outbox.pending().unwrap();
        assert_eq!(seqs(&pending), vec![1, 4]);
        assert_eq!(outbox.dropped_total(), 4);
        assert_eq!(outbox.pending_sequences(), vec![1, 4]);
        assert_eq!(outbox.push(batch(8)).unwrap(), 8);
        assert_eq!(outbox.read(8).unwrap().unwrap().dropped_batches_total, 4);
        let leftovers: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        drop(outbox);
        let outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.dropped_total(), 4);
        assert_eq!(outbox.pending_sequences(), vec![1, 4, 8]);
    }

    #[test]
    fn a_damaged_state_file_is_recovered_from() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
            outbox.push(batch(1)).unwrap();
            outbox.push(batch(2)).unwrap();
        }
        std::fs::write(dir.path().join(STATE_FILE), "\u{0}\u{1}junk").unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.last_sequence(), 2);
        assert_eq!(outbox.push(batch(3)).unwrap(), 3);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        let err = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap_err();
        assert!(matches!(err, OutboxError::Locked(_)), "{err}");
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let err = Outbox::open(file.join("telemetry"), DEFAULT_OUTBOX_CAP_BYTES).unwrap_err();
        assert!(err.to_string().contains("telemetry queue"), "{err}");
    }

    /// The queue lost its state and files, numbered four batches 1 to 4
    /// while offline, then learns the control plane has stored up to 2 (of
    /// the numbering before the loss): all four were never sent, and are
    /// kept, after every number assigned, in order; not 1 and 2 deleted as
    /// acknowledged.
    #[test]
    fn batches_queued_after_the_state_was_lost_are_renumbered_below_the_counter_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        for i in 1..=4 {
            outbox.push(batch(i * 10)).unwrap();
        }
        assert_eq!(outbox.ack(2).unwrap(), 0);
        let waiting = outbox.pending().unwrap();
        assert_eq!(seqs(&waiting), vec![5, 6, 7, 8]);
        assert_eq!(starts(&waiting), vec![10, 20, 30, 40]);
        assert_eq!(outbox.push(batch(50)).unwrap(), 9);
        // Verified now: later acks are ordinary.
        assert_eq!(outbox.ack(6).unwrap(), 2);
        assert_eq!(outbox.pending_sequences(), vec![7, 8, 9]);
        drop(outbox);
        let state = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let state = State::decode(&state).unwrap();
        assert_eq!((state.unverified_after, state.renumber_through), (None, 0));
    }

    /// The mark survives a restart between the loss and the first Welcome;
    /// batches that were on disk before the loss keep their numbers (the
    /// control plane may have stored them: renumbered, they would be stored
    /// twice), and only those the Welcome acknowledges go.
    #[test]
    fn the_state_lost_is_remembered_until_the_welcome_and_older_batches_keep_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut outbox = open_verified(dir.path(), DEFAULT_OUTBOX_CAP_BYTES);
            for i in 1..=5 {
                outbox.push(batch(i)).unwrap();
            }
            outbox.ack(2).unwrap();
        }
        // 3 to 5 were sent and stored; their ack was lost, then the state.
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        {
            let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
            assert_eq!(outbox.push(batch(6)).unwrap(), 6);
        }
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert_eq!(outbox.push(batch(7)).unwrap(), 7);
        // The control plane has 3 to 5, nothing above.
        assert_eq!(outbox.ack(5).unwrap(), 3);
        assert_eq!(starts(&outbox.pending().unwrap()), vec![6, 7]);
        assert_eq!(outbox.pending_sequences(), vec![6, 7]);

        // Lost again, after the control plane stored up to 9 (batches the
        // queue no longer has): 6 and 7 are of the old numbering and stored
        // too; the two queued since are numbered after 9.
        drop(outbox);
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        outbox.push(batch(80)).unwrap();
        outbox.push(batch(90)).unwrap();
        assert_eq!(outbox.pending_sequences(), vec![6, 7, 8, 9]);
        assert_eq!(outbox.ack(9).unwrap(), 2);
        assert_eq!(outbox.pending_sequences(), vec![10, 11]);
        assert_eq!(starts(&outbox.pending().unwrap()), vec![80, 90]);
    }

    /// A renumbering whose state cannot be saved after it renamed a batch
    /// (a full disk): the number that batch now has is never given to a new
    /// one, which would replace it.
    #[test]
    fn a_renamed_batchs_number_is_not_reused_when_the_state_cannot_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        outbox.push(batch(10)).unwrap();
        outbox.push(batch(20)).unwrap();
        // The renumbering's start is saved, then the disk is full: batch 1
        // is renamed to 11 and the counter cannot be saved.
        outbox.state_saves_left = Some(1);
        assert!(outbox.ack(10).is_err());
        assert!(dir.path().join(batch_file_name(11)).exists());
        outbox.state_saves_left = None;
        let pushed = outbox.push(batch(30)).unwrap();
        assert!(pushed > 11, "the push took {pushed}");
        // The next Welcome finishes the renumbering; nothing was lost.
        assert_eq!(outbox.ack(10).unwrap(), 0);
        let mut kept = starts(&outbox.pending().unwrap());
        kept.sort();
        assert_eq!(kept, vec![10, 20, 30]);
        assert!(outbox.pending_sequences().iter().all(|&s| s > 10));
    }

    #[test]
    fn state_round_trips() {
        let state = State {
            last_sequence: 42,
            dropped_total: 7,
            renumber_through: 3,
            renumber_after: 0,
            unverified_after: None,
        };
        assert_eq!(State::decode(&state.encode()), Ok(state));
        let state = State {
            renumber_after: 2,
            unverified_after: Some(9),
            ..state
        };
        assert_eq!(State::decode(&state.encode()), Ok(state));
        // Written before renumbering existed: none under way.
        let older = "edgefleet telemetry outbox v1\nlast_sequence=5\ndropped_batches_total=1\n";
        assert_eq!(State::decode(older).unwrap().renumber_through, 0);
        assert_eq!(State::decode(older).unwrap().unverified_after, None);
        assert!(State::decode("edgefleet telemetry outbox v1\nlast_sequence=x\n").is_err());
        assert!(State::decode("").is_err());
    }
}
