//! The processes `exec` started, apart from the connections that watch them: a registry by
//! id, and per process a bounded buffer of output ([`Ring`]) that an attached client drains
//! and a re-attaching one replays.
//!
//! While a client is attached the buffer only holds what it has not taken yet, and a full
//! buffer stops the process's output (its pipe fills): backpressure, never unbounded memory.
//! With no client, output keeps flowing and the oldest is dropped beyond the bound; the next
//! client to attach is told how many bytes it missed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use keel_proto::exec::{ExitStatus, ProcInfo, WinSize};
use tokio::sync::{mpsc, watch, Notify};

/// Output kept per process while no client is attached (for the next one's replay).
pub const RING_BYTES: usize = 1 << 20;
/// Output held for an attached client before the process is made to wait for it: the
/// client is reading, so a little ahead is enough, and 16 busy processes stay small.
pub const ATTACHED_BYTES: usize = 256 << 10;
/// Ended processes remembered (for `ps` and a late attach) before the oldest is forgotten.
pub const KEEP_ENDED: usize = 32;

/// Output of a process, oldest first, at most `cap` bytes.
#[derive(Debug)]
pub struct Ring {
    chunks: VecDeque<(u8, Vec<u8>)>,
    bytes: usize,
    cap: usize,
    /// Bytes dropped since the last [`Ring::take_dropped`].
    dropped: u64,
    /// Emptied read buffers, kept for the next reads (at most [`SPARE_BUFFERS`]): a streaming
    /// process costs no allocation per chunk, and no page faults on a fresh one.
    spare: Vec<Vec<u8>>,
    /// Bytes taken by [`Ring::pop_batch`] and not yet [`Ring::sent`] or put back.
    in_flight: usize,
}

/// Read buffers a ring keeps for reuse.
pub const SPARE_BUFFERS: usize = 2;

impl Ring {
    /// An empty ring of `cap` bytes.
    pub fn new(cap: usize) -> Ring {
        Ring {
            chunks: VecDeque::new(),
            bytes: 0,
            cap,
            dropped: 0,
            spare: Vec::new(),
            in_flight: 0,
        }
    }

    /// Whether `n` more bytes fit under `limit`, counting what is held and what is being
    /// sent (an empty ring with nothing in flight takes any chunk).
    pub fn has_room(&self, n: usize, limit: usize) -> bool {
        self.bytes + self.in_flight + n <= limit.min(self.cap)
            || (self.chunks.is_empty() && self.in_flight == 0)
    }

    /// Appends a chunk of stream `kind`; beyond the bound the oldest chunks go (counted).
    pub fn push(&mut self, kind: u8, data: Vec<u8>) {
        self.bytes += data.len();
        self.chunks.push_back((kind, data));
        while self.bytes > self.cap && self.chunks.len() > 1 {
            if let Some((_, old)) = self.chunks.pop_front() {
                self.bytes -= old.len();
                self.dropped += old.len() as u64;
            }
        }
    }

    /// Takes the oldest chunk.
    pub fn pop(&mut self) -> Option<(u8, Vec<u8>)> {
        let c = self.chunks.pop_front()?;
        self.bytes -= c.1.len();
        Some(c)
    }

    /// Takes the oldest chunk and, while they are of the same stream, the ones after it, up
    /// to `max` bytes in all: one frame for what a process wrote in many writes, its chunks
    /// written as they are (no copy).
    pub fn pop_batch(&mut self, max: usize) -> Option<Batch> {
        let (kind, first) = self.pop()?;
        let mut bytes = first.len();
        let mut chunks = vec![first];
        while let Some((k, next)) = self.chunks.front() {
            if *k != kind || bytes + next.len() > max {
                break;
            }
            let (_, next) = self.pop().expect("a front chunk");
            bytes += next.len();
            chunks.push(next);
        }
        self.in_flight += bytes;
        Some(Batch { kind, chunks })
    }

    /// A batch went out: its bytes stop counting against the bound, its buffers of capacity
    /// `cap` are kept for reuse ([`Ring::buffer`]).
    pub fn sent(&mut self, b: Batch, cap: usize) {
        self.in_flight = self.in_flight.saturating_sub(b.len());
        self.recycle(b.chunks, cap);
    }

    /// Puts a batch back in front, in its order (it could not be sent).
    pub fn unpop(&mut self, b: Batch) {
        self.in_flight = self.in_flight.saturating_sub(b.len());
        for c in b.chunks.into_iter().rev() {
            self.bytes += c.len();
            self.chunks.push_front((b.kind, c));
        }
    }

    /// An empty buffer of capacity `cap`: a kept one, or a new one.
    pub fn buffer(&mut self, cap: usize) -> Vec<u8> {
        self.spare.pop().unwrap_or_else(|| Vec::with_capacity(cap))
    }

    /// Keeps sent chunks' buffers of capacity `cap` for [`Ring::buffer`], up to
    /// [`SPARE_BUFFERS`]; the rest are freed.
    fn recycle(&mut self, chunks: Vec<Vec<u8>>, cap: usize) {
        for mut c in chunks {
            if self.spare.len() >= SPARE_BUFFERS {
                return;
            }
            if c.capacity() == cap {
                c.clear();
                self.spare.push(c);
            }
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Bytes dropped since the last call, and resets the count.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// Chunks of one stream taken together for one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Which stream.
    pub kind: u8,
    /// The chunks, oldest first.
    pub chunks: Vec<Vec<u8>>,
}

impl Batch {
    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a client sends to a running process.
#[derive(Debug)]
pub enum Input {
    /// Bytes for its stdin.
    Stdin(Vec<u8>),
    /// Its stdin ended.
    Close,
    /// A signal for its group.
    Signal(i32),
    /// A new terminal size.
    Resize(WinSize),
}

/// The changing part of a process.
#[derive(Debug)]
pub struct State {
    /// Output not taken yet.
    pub ring: Ring,
    /// How it ended, once it has.
    pub exit: Option<ExitStatus>,
    /// A client is attached.
    pub attached: bool,
    /// When the last client left (for the grace period).
    pub lost_at: Option<Instant>,
}

/// One process `exec` started.
#[derive(Debug)]
pub struct Proc {
    /// Its id for `attach`, `kill` and `ps`.
    pub id: u64,
    /// Its pid (and process group) in the guest.
    pub pid: u32,
    /// What runs.
    pub argv: Vec<String>,
    /// When it started.
    pub started: SystemTime,
    /// Started with `--detach`: it outlives its clients without a grace period.
    pub detached: bool,
    /// Who started it (principal), for `ps`.
    pub owner: String,
    /// It runs on a pty (resizes apply).
    pub tty: bool,
    /// To the process's pump.
    pub input: mpsc::Sender<Input>,
    /// Output, exit, attachment.
    pub state: Mutex<State>,
    /// Bumped on every change the attached client should see (output, exit).
    pub changed: watch::Sender<u64>,
    /// Woken when the client took output (room in the ring) or left.
    pub room: Notify,
    /// Woken when a client attaches or is lost (the pump's grace deadline changes).
    pub attachment: Notify,
}

impl Proc {
    /// Locks the state (a poisoned lock is still the state).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the attached client something changed.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// What `ps` shows.
    pub fn info(&self) -> ProcInfo {
        let st = self.lock();
        ProcInfo {
            id: self.id,
            pid: self.pid,
            argv: self.argv.clone(),
            started: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            attached: st.attached,
            detached: self.detached,
            buffered: st.ring.len() as u64,
            exit: st.exit,
            owner: self.owner.clone(),
        }
    }
}

/// Every process the agent started and has not forgotten.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Proc>>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Proc>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a process; forgets the oldest ended ones beyond [`KEEP_ENDED`].
    pub fn insert(&self, p: Arc<Proc>) {
        let mut m = self.map();
        m.insert(p.id, p);
        let mut ended: Vec<u64> = m
            .values()
            .filter(|p| p.lock().exit.is_some())
            .map(|p| p.id)
            .collect();
        if ended.len() > KEEP_ENDED {
            ended.sort_unstable();
            for id in &ended[..ended.len() - KEEP_ENDED] {
                m.remove(id);
            }
        }
    }

    /// The process `id`.
    pub fn get(&self, id: u64) -> Option<Arc<Proc>> {
        self.map().get(&id).cloned()
    }

    /// Forgets `id` (its end was delivered).
    pub fn remove(&self, id: u64) {
        self.map().remove(&id);
    }

    /// Every process, by id.
    pub fn list(&self) -> Vec<ProcInfo> {
        let procs: Vec<Arc<Proc>> = self.map().values().cloned().collect();
        let mut v: Vec<ProcInfo> = procs.iter().map(|p| p.info()).collect();
        v.sort_by_key(|p| p.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_and_counts_what_it_dropped() {
        let mut r = Ring::new(10);
        r.push(4, vec![1; 4]);
        r.push(5, vec![2; 4]);
        assert!(r.has_room(2, 10) && !r.has_room(3, 10) && !r.has_room(2, 9));
        r.push(4, vec![3; 4]);
        assert_eq!(r.len(), 8);
        assert_eq!(r.take_dropped(), 4);
        assert_eq!(r.take_dropped(), 0);
        assert_eq!(r.pop(), Some((5, vec![2; 4])));
        let b = r.pop_batch(100).unwrap();
        r.unpop(b);
        assert_eq!(r.pop(), Some((4, vec![3; 4])));
        assert!(r.is_empty());
        // Batches: same stream only, up to the bound, back in order when not sent.
        r.push(4, vec![1; 3]);
        r.push(4, vec![2; 3]);
        r.push(5, vec![3; 1]);
        let one = |kind, chunks| Some(Batch { kind, chunks });
        assert_eq!(r.pop_batch(5), one(4, vec![vec![1; 3]]));
        r.unpop(Batch {
            kind: 4,
            chunks: vec![vec![1; 3]],
        });
        let b = r.pop_batch(100).unwrap();
        assert_eq!(
            (b.len(), &b),
            (
                6,
                &Batch {
                    kind: 4,
                    chunks: vec![vec![1; 3], vec![2; 3]]
                }
            )
        );
        r.unpop(b);
        assert_eq!(r.len(), 7);
        for want in [one(4, vec![vec![1; 3], vec![2; 3]]), one(5, vec![vec![3]])] {
            let b = r.pop_batch(100);
            assert_eq!(b, want);
            r.sent(b.unwrap(), 64);
        }
        // What is being sent counts against the bound until it is sent.
        r.push(4, vec![1; 6]);
        let b = r.pop_batch(100).unwrap();
        assert!(r.is_empty() && !r.has_room(5, 10) && r.has_room(4, 10));
        r.sent(b, 64);
        assert!(r.has_room(10, 10));
        // Sent buffers of the read size come back empty, at most SPARE_BUFFERS of them.
        let bufs: Vec<Vec<u8>> = (0..6).map(|_| Vec::with_capacity(64)).collect();
        r.sent(
            Batch {
                kind: 4,
                chunks: bufs,
            },
            64,
        );
        r.sent(
            Batch {
                kind: 4,
                chunks: vec![Vec::with_capacity(8)],
            },
            64,
        );
        let mut kept = Vec::new();
        for _ in 0..SPARE_BUFFERS + 1 {
            kept.push(r.buffer(64));
        }
        assert!(kept.iter().all(|b| b.is_empty() && b.capacity() >= 64));
        // A chunk larger than the ring is kept whole (the ring holds at least one).
        r.push(4, vec![0; 20]);
        assert_eq!(r.len(), 20);
        assert!(!r.has_room(100, 1000));
    }
}
