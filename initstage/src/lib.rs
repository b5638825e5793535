//! initstage: keel's `/init`.
//!
//! | module | what it is for |
//! |---|---|
//! | [`cmdline`] | kernel command line → [`cmdline::Config`] (pure) |
//! | [`modules`] | `modules=` with dependencies from modules.dep; finit_module, compressed ones decoded in user space when the kernel cannot |
//! | [`blkid`] | the few libblkid functions used, declared by hand |
//! | [`probe`] | partitions by filesystem LABEL, waiting for them |
//! | [`promote`] | the promotion / rollback / trial state machine (pure, returns a plan) |
//! | [`apply`] | runs a plan: copy-verify, atomic state writes, renames, fsyncs |
//! | [`loopdev`] | read-only autoclear loop devices with LOOP_CONFIGURE |
//! | [`verity`] | whether the image is read through dm-verity (pure), and its device-mapper device |
//! | [`mountplan`] | what to mount where (pure) |
//! | [`mounts`] | mount(2) with undo |
//! | [`persist`] | `keelctl persist` batches into `persistent/`, checked first, crash-safe |
//! | [`boot`] | one boot: steps 2–9, shared by PID 1 and `prepare` |
//! | [`switch_root`] | switch_root in the canonical order, exec init |
//! | [`pid1`] | PID 1 mode |
//! | [`kmsg`] | logging to the console and /dev/kmsg, one line a step |
//! | [`failpoint`] | crash injection for tests (feature `failpoints`) |
#![warn(missing_docs)]

pub mod apply;
pub mod blkid;
pub mod boot;
pub mod cmdline;
pub mod error;
pub mod failpoint;
pub mod kmsg;
pub mod loopdev;
pub mod modules;
pub mod mountplan;
pub mod mounts;
pub mod persist;
pub mod pid1;
pub mod probe;
pub mod promote;
pub mod switch_root;
pub mod verity;
