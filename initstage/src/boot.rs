//! One boot's work between "the kernel started us" and switch_root (steps 2–9 of the boot
//! flow): find partitions, promote or roll back, mount the image and the overlay, write
//! `boot.json`. Shared by PID 1 mode and `initstage prepare`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_proto::bootstate::BootState;
use keel_proto::layout::Names;
use keel_proto::manifest::VerifyingKey;
use keel_proto::persist::PERSIST_DIR;
use keel_proto::report::{BootReport, FoundPartition};

use crate::apply::{self, Dirs};
use crate::blkid;
use crate::cmdline::Config;
use crate::error::{Error, IoContext, Result};
use crate::kmsg::step;
use crate::loopdev;
use crate::mountplan::{self, Access, Layout, MountOp};
use crate::mounts::Mounts;
use crate::persist;
use crate::probe::{self, Partitions, Scope};
use crate::promote::{self, Step};
use crate::switch_root::init_present;
use crate::verity;

/// Inputs of one boot.
#[derive(Debug, Clone)]
pub struct Options {
    /// Parsed command line.
    pub cfg: Config,
    /// Paths.
    pub layout: Layout,
    /// Which block devices to probe.
    pub scope: Scope,
    /// Trusted keys; when non-empty, a staged manifest must verify with one of them.
    pub keys: Vec<VerifyingKey>,
    /// The trusted-key file exists but is unusable (why): nothing is promoted, the staged
    /// image is left in place for a fixed key file.
    pub keys_error: Option<String>,
    /// Modules `modules=` named that the initramfs did not have, to load from `boot`.
    pub modules_pending: Vec<String>,
}

/// Result of a prepared boot.
#[derive(Debug)]
pub struct Prepared {
    /// What was found and done.
    pub report: BootReport,
    /// The mounted upper filesystem's trash directory, to empty off the boot path.
    pub trash: Option<PathBuf>,
}

fn image_fstype(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            detail: "image file is missing".into(),
        });
    }
    let sb = blkid::probe(path).map_err(|e| Error::Probe {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    match sb.fstype.as_deref() {
        Some(t @ ("squashfs" | "erofs")) => Ok(t.to_string()),
        other => Err(Error::ImageType {
            path: path.to_path_buf(),
            found: other.unwrap_or("no known filesystem").to_string(),
        }),
    }
}

/// Loop-mounts the image read-only at `<run>/ro`, through dm-verity when `verity` says so
/// (every block read first when `check_all`: the last boot of this image was not confirmed).
fn mount_image(
    image: &Path,
    layout: &Layout,
    mounts: &mut Mounts,
    verity: &verity::Decision,
    check_all: bool,
) -> Result<String> {
    if let verity::Decision::Refuse(why) = verity {
        return Err(Error::Dm(why.clone()));
    }
    let fstype = image_fstype(image)?;
    let dev = loopdev::attach_read_only(image)?;
    let source = match verity {
        verity::Decision::Use(v) => {
            let node = verity::setup(&dev, v)?;
            if check_all {
                step("verity: check every block", || {
                    verity::check_all(&node, image, v)
                })?;
            }
            node
        }
        _ => dev.path.clone(),
    };
    // On an error the caller names a corrupt block and removes the verity device.
    mounts.mount(&MountOp {
        source: source.display().to_string(),
        target: layout.ro(),
        fstype: fstype.clone(),
        access: Access::ReadOnly,
        data: String::new(),
    })?;
    // `dev` drops here: the mount (or the verity device) holds it; autoclear frees it.
    Ok(fstype)
}

/// What verity does for the image the state names current.
fn verity_decision(opts: &Options, image: &Path, state: &BootState) -> verity::Decision {
    if opts.cfg.verity == crate::cmdline::VerityMode::Off {
        return verity::Decision::Plain(None);
    }
    let manifest = verity::read_manifest(image);
    // device-mapper is loaded only for an image that carries a tree: a plain boot pays nothing.
    let has_tree = matches!(&manifest, Ok(Some(m)) if m.manifest.verity.is_some());
    // Both steps only time what they do: neither can fail.
    let kernel_has_dm = has_tree
        && step(
            "verity: kernel support",
            || -> std::result::Result<_, Infallible> {
                let release = rustix::system::uname();
                let modules =
                    Path::new("/lib/modules").join(release.release().to_string_lossy().as_ref());
                Ok(verity::ensure_kernel_support(&modules))
            },
        )
        .unwrap_or_else(|e| match e {});
    step(
        "verity: check the manifest",
        || -> std::result::Result<_, Infallible> {
            Ok(verity::decide(
                opts.cfg.verity,
                state.current.as_ref(),
                manifest,
                &opts.keys,
                kernel_has_dm,
            ))
        },
    )
    .unwrap_or_else(|e| match e {})
}

/// Moves the old upper and work into `.trash` (a rename: O(1) whatever they hold) and makes
/// fresh empty ones.
fn rotate_upper(up: &mountplan::UpperPlan) -> Result<Option<PathBuf>> {
    let trash = up.base.join(".trash");
    std::fs::create_dir_all(&trash).ctx("create", &trash)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for (dir, name) in [(&up.upper, "upper"), (&up.work, "work")] {
        if dir.exists() {
            let to = trash.join(format!("{name}.{stamp}"));
            std::fs::rename(dir, &to).ctx("rename aside", dir)?;
        }
    }
    Ok(Some(trash))
}

fn prepare_upper(up: &mountplan::UpperPlan, mounts: &mut Mounts) -> Result<Option<PathBuf>> {
    if let Some(w) = &up.warning {
        log::warn!("{w}");
    }
    if let Some(t) = &up.tmpfs {
        mounts.mount(t)?;
    }
    let trash = if up.rotate { rotate_upper(up)? } else { None };
    for d in [&up.upper, &up.work] {
        std::fs::create_dir_all(d).ctx("create", d)?;
    }
    if let Some(p) = &up.persistent {
        std::fs::create_dir_all(p).ctx("create", p)?;
    }
    Ok(trash)
}

/// Fails closed on an unusable key file: no staged image is trusted, so none is promoted
/// and none is removed (it waits on `newimg` for a fixed key file). Returns what to report.
pub fn distrust_staged(facts: &mut promote::Facts, keys_error: Option<&str>) -> Option<String> {
    let e = keys_error?;
    let had = !matches!(facts.staged, promote::Staged::None);
    facts.staged = promote::Staged::None;
    had.then(|| format!("trusted keys unusable ({e}): staged image not promoted, left in place"))
}

/// Runs the promotion plan; a staged image that fails its copy is refused, never booted.
fn promote_and_account(
    opts: &Options,
    dirs: &Dirs,
    actions: &mut Vec<String>,
) -> Result<BootState> {
    let state = match apply::load_state(&dirs.img) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            log::error!("{e}; starting from a fresh state");
            actions.push(format!("boot state unreadable ({e}); started afresh"));
            BootState::default()
        }
    };
    let mut facts = apply::gather_facts(dirs, &opts.keys);
    if state.current.is_none() && facts.current_exists {
        // Adopting: the manifest must describe the image that is there.
        if let Some(rec) = &facts.adopt {
            let (rec, why) = apply::check_adopt(dirs, rec);
            if let Some(why) = why {
                log::warn!("{why}");
                actions.push(why);
            }
            facts.adopt = Some(rec);
        }
        if facts.old_exists {
            facts.adopt_old = Some(apply::adopt_old(dirs));
        }
    }
    if let Some(why) = distrust_staged(&mut facts, opts.keys_error.as_deref()) {
        log::error!("{why}");
        actions.push(why);
    }
    let plan = promote::plan(&state, &facts, opts.cfg.tries);
    for s in &plan.steps {
        if let Err(e) = apply::run_step(s, dirs) {
            if let (Step::CopyStaged { .. }, Some(m)) = (s, apply::staged_manifest(&facts)) {
                if e.is_no_space() {
                    // A full img says nothing about the image: keep it staged, boot on.
                    let why = format!(
                        "img is full: version {} stays staged, not promoted ({e}); free room on img",
                        m.version
                    );
                    log::error!("{why}");
                    actions.push(why);
                    apply::run_step(&Step::RemoveNewTmp, dirs)?;
                    let mut f = apply::gather_facts(dirs, &opts.keys);
                    f.staged = promote::Staged::None;
                    let follow = promote::plan(&state, &f, opts.cfg.tries);
                    apply::execute(&follow, dirs)?;
                    actions.extend(follow.actions);
                    return Ok(follow.state);
                }
                let rej = promote::plan_reject_staged(&state, m, &e.to_string());
                log::error!("{}", rej.actions[0]);
                apply::execute(&rej, dirs)?;
                actions.extend(rej.actions);
                // Then this boot's ordinary accounting, from the state just written.
                let follow = promote::plan(
                    &rej.state,
                    &apply::gather_facts(dirs, &opts.keys),
                    opts.cfg.tries,
                );
                apply::execute(&follow, dirs)?;
                actions.extend(follow.actions);
                return Ok(follow.state);
            }
            return Err(e);
        }
    }
    // Logged once they happened, not before.
    for a in &plan.actions {
        log::info!("{a}");
    }
    actions.extend(plan.actions.iter().cloned());
    Ok(plan.state)
}

/// Prepares the new root: everything up to (not including) switch_root.
pub fn prepare(opts: &Options) -> Result<Prepared> {
    let mut mounts = Mounts::default();
    match prepare_inner(opts, &mut mounts) {
        Ok(p) => {
            mounts.keep();
            Ok(p)
        }
        Err(e) => {
            mounts.unwind();
            Err(e)
        }
    }
}

fn prepare_inner(opts: &Options, mounts: &mut Mounts) -> Result<Prepared> {
    let cfg = &opts.cfg;
    let layout = &opts.layout;
    let parts: Partitions = step("find partitions", || {
        probe::wait_for(&opts.scope, &cfg.labels, cfg.wait)
    })?;
    for f in parts.all() {
        log::info!(
            "{} = {} ({}, label {:?})",
            f.role,
            f.device.display(),
            f.fstype,
            f.label
        );
    }
    for why in &parts.refused {
        log::warn!("{why}");
    }
    for role in ["overlay", "newimg", "boot"] {
        if !parts.all().any(|f| f.role == role) {
            log::info!("no {role} partition");
        }
    }
    step("mount partitions", || -> Result<()> {
        for op in mountplan::partition_mounts(&parts, layout) {
            mounts.mount(&op)?;
        }
        Ok(())
    })?;
    if !opts.modules_pending.is_empty() {
        if parts.boot.is_some() {
            let release = rustix::system::uname();
            let dir = layout
                .part("boot")
                .join("modules")
                .join(release.release().to_string_lossy().as_ref());
            step("load modules from boot", || {
                crate::modules::load_all(&dir, &opts.modules_pending).map(|missing| {
                    for m in missing {
                        log::warn!("module {m} not found in the initramfs or {}", dir.display());
                    }
                })
            })?;
        } else {
            log::warn!(
                "modules not found and no boot partition: {}",
                opts.modules_pending.join(",")
            );
        }
    }

    let dirs = Dirs {
        img: layout.part("img"),
        newimg: parts.newimg.as_ref().map(|_| layout.part("newimg")),
        names: Names::for_image(&cfg.image),
    };
    let mut actions = parts.refused.clone();
    let mut state = step("promotion", || {
        promote_and_account(opts, &dirs, &mut actions)
    })?;

    // Mount the current image; if it (or its init) fails, fall back to the previous one.
    let image = dirs.img.join(&dirs.names.current);
    let up = mountplan::upper_plan(cfg, parts.overlay.is_some(), layout);
    // `keelctl persist` batches go into persistent/ before it is a lower layer.
    let persisted = match &up.persistent {
        Some(p) if layout.part("overlay").join(PERSIST_DIR).is_dir() => step("persist", || {
            Ok::<_, Infallible>(persist::apply_all(&layout.part("overlay"), p))
        })
        .unwrap_or_else(|e| match e {}),
        _ => Vec::new(),
    };
    for b in &persisted {
        actions.push(match &b.error {
            None => format!("persisted batch {}: {} entries", b.batch, b.applied),
            Some(e) => format!("persist batch {}: {e}", b.batch),
        });
    }
    let mut attempt = 0;
    let (fstype, trash, decision) = loop {
        attempt += 1;
        let mark = mounts.mark();
        let decision = verity_decision(opts, &image, &state);
        if let verity::Decision::Plain(Some(why)) = &decision {
            log::warn!("{why}");
            actions.push(why.clone());
        }
        let check_all = matches!(decision, verity::Decision::Use(_))
            && state
                .current
                .as_ref()
                .is_some_and(|c| verity::unconfirmed(&dirs.img, &c.sha256));
        if check_all {
            let why = format!(
                "verity: the last boot of version {} was not confirmed (a restart on a corrupt \
                 block, a crash or a power cut): every block checked before it boots again",
                state.current.as_ref().map_or(0, |c| c.version)
            );
            log::warn!("{why}");
            actions.push(why);
        }
        let r = step(
            "mount image and overlay",
            || -> Result<(String, Option<PathBuf>)> {
                let fstype = mount_image(&image, layout, mounts, &decision, check_all)?;
                let trash = prepare_upper(&up, mounts)?;
                mounts.mount(&mountplan::overlay_mount(&up, layout))?;
                if !init_present(&layout.sysroot, &cfg.init) {
                    return Err(Error::InitMissing {
                        init: cfg.init.clone(),
                        sysroot: layout.sysroot.clone(),
                    });
                }
                Ok((fstype, trash))
            },
        );
        match r {
            Ok((f, t)) => break (f, t, decision),
            Err(e) => {
                // The one place a failed attempt is undone: a corrupt block named, the
                // mounts unwound, then the verity device (no longer held) removed.
                let e = match &decision {
                    verity::Decision::Use(v) => verity::explain(e, &image, v),
                    _ => e,
                };
                mounts.unwind_to(mark);
                if matches!(decision, verity::Decision::Use(_)) {
                    verity::teardown();
                }
                if attempt > 1 {
                    return Err(e);
                }
                let facts = apply::gather_facts(&dirs, &[]);
                let reason = format!("image failed: {e}");
                let Some(rb) = promote::plan_rollback(&state, &facts, &reason) else {
                    return Err(e);
                };
                log::error!("{}", rb.actions[0]);
                step("roll back", || apply::execute(&rb, &dirs))?;
                actions.extend(rb.actions.iter().cloned());
                state = rb.state;
            }
        }
    };
    let boot_verity = match &decision {
        verity::Decision::Use(v) => Some(step("verity: restart on corruption", || {
            // Written before the restart is armed: a restart from here on is found at the
            // next boot, which then checks every block first.
            if let Some(c) = &state.current {
                verity::mark_unconfirmed(&dirs.img, &c.sha256)?;
            }
            verity::arm_restart(v).map(|on| keel_proto::report::BootVerity {
                root_hash: v.root_hash.to_ascii_lowercase(),
                device: format!("/dev/mapper/{}", verity::DM_NAME),
                on_corruption: on,
            })
        })?),
        _ => None,
    };
    step("layer views", || -> Result<()> {
        for b in mountplan::layer_binds(&up, layout) {
            mounts.mount(&b)?;
        }
        Ok(())
    })?;

    // A trial boot that hangs before it is confirmed is reset by the watchdog, and the next
    // boot counts it as a failed trial. Not armed is a warning, never a failed boot.
    let watchdog = match (cfg.watchdog, state.trial) {
        (Some(secs), Some(_)) => {
            let dev = std::path::Path::new(keel_sys::watchdog::DEVICE);
            match step("watchdog", || keel_sys::watchdog::arm(dev, secs)) {
                Ok(t) => {
                    actions.push(format!(
                        "armed {} with {t} s for this trial boot",
                        dev.display()
                    ));
                    Some(t)
                }
                Err(e) => {
                    actions.push(format!(
                        "watchdog not armed: {}: {e} (is its driver in modules=?)",
                        dev.display()
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    let current = state
        .current
        .clone()
        .unwrap_or_else(keel_proto::bootstate::ImageRecord::unknown);
    let report = BootReport {
        initstage_version: env!("CARGO_PKG_VERSION").into(),
        image_file: cfg.image.clone(),
        booted: current,
        image_fstype: fstype,
        trial: state.trial,
        tries_left: state.trial.map(|t| t.left()),
        boot_count: state.boot_count,
        partitions: parts
            .all()
            .map(|f| FoundPartition {
                role: f.role.into(),
                label: f.label.clone(),
                device: f.device.display().to_string(),
                fstype: f.fstype.clone(),
                mountpoint: layout.part(f.role).display().to_string(),
            })
            .collect(),
        upper: up.kind.into(),
        actions,
        run_dir: layout.run.display().to_string(),
        verity: boot_verity,
        watchdog,
        persisted,
    };
    let rp = layout.report();
    std::fs::write(&rp, report.to_json()).ctx("write", &rp)?;
    log::info!(
        "booting {} version {}{}",
        report.booted.name,
        report.booted.version,
        match report.trial {
            Some(t) => format!(" (trial boot {} of {})", t.used, t.tries),
            None => String::new(),
        }
    );
    Ok(Prepared { report, trash })
}

/// Empties a trash directory (old upper layers), off the boot path.
/// Entries that vanish meanwhile are not errors: under initstage as PID 1 its own cleaner and
/// `keel-clean-trash.service` may both be at work (a missing trash is empty).
pub fn clean_trash(trash: &Path) -> std::io::Result<()> {
    let t = Instant::now();
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    let entries = match std::fs::read_dir(trash) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    for e in entries {
        let p = e?.path();
        // The overlay's work dir holds a mode-000 "work" directory: plain recursive removal
        // as root copes with it (a symlink is removed, never followed).
        gone(std::fs::remove_dir_all(&p).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotADirectory {
                std::fs::remove_file(&p)
            } else {
                Err(e)
            }
        }))?;
    }
    log::info!(
        "emptied {} ({} ms)",
        trash.display(),
        crate::kmsg::Ms(t.elapsed())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::manifest::{Manifest, MANIFEST_FORMAT};

    #[test]
    fn a_broken_key_file_promotes_nothing_and_removes_nothing() {
        let staged = promote::Staged::Ready(Manifest {
            format: MANIFEST_FORMAT,
            name: "a".into(),
            version: 2,
            size: 1,
            sha256: "00".repeat(32),
            created: 0,
            min_version: None,
            verity: None,
        });
        let facts = promote::Facts {
            current_exists: true,
            staged,
            ..promote::Facts::default()
        };
        let state = BootState::default();
        let mut f = facts.clone();
        assert!(distrust_staged(&mut f, None).is_none());
        assert!(promote::plan(&state, &f, 2)
            .steps
            .iter()
            .any(|s| matches!(s, Step::CopyStaged { .. })));
        let mut f = facts.clone();
        let why = distrust_staged(&mut f, Some("PEM block 2 (line 4): RSA")).unwrap();
        assert!(why.contains("PEM block 2"), "{why}");
        let plan = promote::plan(&state, &f, 2);
        assert!(!plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::CopyStaged { .. } | Step::RemoveStaged)));
    }

    #[test]
    fn clean_trash_empties_without_following_links_and_a_missing_trash_is_empty() {
        let base = std::env::temp_dir().join(format!("keel-trash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (trash, keep) = (base.join(".trash"), base.join("keep"));
        std::fs::create_dir_all(trash.join("upper-1/etc/a/b")).unwrap();
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join("f"), "x").unwrap();
        std::fs::write(trash.join("upper-1/etc/a/b/f"), "x").unwrap();
        std::fs::write(trash.join("stray"), "x").unwrap();
        std::os::unix::fs::symlink(&keep, trash.join("link")).unwrap();
        clean_trash(&trash).unwrap();
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
        assert_eq!(std::fs::read(keep.join("f")).unwrap(), b"x");
        clean_trash(&base.join("absent")).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
