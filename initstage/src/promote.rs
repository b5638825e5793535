//! The promotion and rollback state machine (pure).
//!
//! [`plan`] looks at the boot state and at what is on disk ([`Facts`]) and returns the steps
//! to run this boot ([`Plan`]); [`crate::apply`] runs them. Every transition that takes more
//! than one rename first records itself in the state (`pending`), so a power cut at any
//! instant leaves either the old or the new image under the current name and a state that
//! says how to finish:
//!
//! | promotion step | on disk after it | a crash here boots |
//! |---|---|---|
//! | `CopyStaged` → `<img>.new` (fsync, verify) | current = A | A; the leftover `.new` is removed, the copy redone |
//! | `WriteState(pending: promote B)` | current = A | A, then the promotion resumes |
//! | `KeepCurrentAsOld` (link A to `-old`) | current = A, old = A | resumes |
//! | `InstallNew` (rename `.new` over current) | current = B, old = A | resumes: state written |
//! | `WriteState(current B, trial)` | done | B on trial |
//! | `RemoveStaged` | staged slot empty | B (a staged copy equal to current is just removed) |
//!
//! Rollback is `WriteState(pending: rollback)`, `RestoreOld` (rename `-old` over current),
//! `WriteState(current A)`.

use keel_proto::bootstate::{BootState, EventKind, ImageRecord, Pending, Trial};
use keel_proto::manifest::{Manifest, VerityInfo};

/// What is on disk, read before planning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// `<image>` exists on img.
    pub current_exists: bool,
    /// `<image-old>` exists on img.
    pub old_exists: bool,
    /// `<image>.new` exists on img.
    pub new_tmp_exists: bool,
    /// `<image-old>.tmp` exists on img.
    pub old_tmp_exists: bool,
    /// The staged slot on newimg.
    pub staged: Staged,
    /// A record for the current image from `<image>.manifest` on img (first boot).
    pub adopt: Option<ImageRecord>,
    /// A record for the `-old` image, checked against its bytes (only read when adopting).
    pub adopt_old: Option<ImageRecord>,
}

/// The staged slot on newimg.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Staged {
    /// Nothing committed (no manifest, or no newimg partition).
    #[default]
    None,
    /// A manifest is there but unusable (why).
    Invalid(String),
    /// A committed image whose manifest parsed (and verified, when keys are known).
    Ready(Manifest),
}

/// One step of a plan, run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Remove a leftover `<image>.new`.
    RemoveNewTmp,
    /// Remove a leftover `<image-old>.tmp`.
    RemoveOldTmp,
    /// Copy the staged image to `<image>.new`, fsync, and check its size and digest.
    CopyStaged {
        /// Expected size.
        size: u64,
        /// Expected sha256, hex.
        sha256: String,
        /// The verity tree the copy must carry (a format 2 manifest).
        verity: Option<VerityInfo>,
    },
    /// Persist this state atomically.
    WriteState(Box<BootState>),
    /// Make `<image-old>` the current image too (link, rename).
    KeepCurrentAsOld,
    /// Rename `<image>.new` over `<image>`.
    InstallNew,
    /// Rename `<image-old>` over `<image>`.
    RestoreOld,
    /// Remove the staged manifest (the commit marker) and then the staged image.
    RemoveStaged,
}

/// What to do this boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// What happened, for people (boot.json, log).
    pub actions: Vec<String>,
    /// The state once every step ran.
    pub state: BootState,
}

fn version_of(r: &Option<ImageRecord>) -> String {
    r.as_ref()
        .map(|r| r.version.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn finish_promotion(s: &mut BootState, new: ImageRecord, had_current: bool, tries: u32) -> String {
    let from = version_of(&s.current);
    s.old = if had_current { s.current.take() } else { None };
    let to = new.version;
    s.current = Some(new);
    s.trial = Some(Trial { tries, used: 1 });
    s.pending = None;
    let msg = format!("promoted version {from} -> {to}; trial of {tries} boots");
    s.push_event(EventKind::Promoted, msg.clone());
    msg
}

fn finish_rollback(s: &mut BootState, reason: &str) -> String {
    let failed = s.current.take();
    if let Some(f) = &failed {
        s.reject(&f.sha256);
    }
    s.current = Some(s.old.take().unwrap_or_else(ImageRecord::unknown));
    s.trial = None;
    s.pending = None;
    let msg = format!(
        "rolled back version {} -> {}: {reason}",
        version_of(&failed),
        version_of(&s.current)
    );
    s.push_event(EventKind::RolledBack, msg.clone());
    msg
}

fn rollback_into(s: &mut BootState, steps: &mut Vec<Step>, reason: &str) -> String {
    let mut mid = s.clone();
    mid.pending = Some(Pending::Rollback {
        reason: reason.to_string(),
    });
    steps.push(Step::WriteState(Box::new(mid)));
    steps.push(Step::RestoreOld);
    finish_rollback(s, reason)
}

/// Plans this boot's promotion, rollback and trial accounting.
pub fn plan(state: &BootState, facts: &Facts, tries: u32) -> Plan {
    let mut s = state.clone();
    let mut steps = Vec::new();
    let mut actions = Vec::new();
    s.boot_count += 1;

    // 1. Finish a transition a power cut interrupted.
    match s.pending.clone() {
        Some(Pending::Promote { new }) => {
            if facts.new_tmp_exists {
                if facts.current_exists {
                    steps.push(Step::KeepCurrentAsOld);
                }
                steps.push(Step::InstallNew);
            }
            let sha = new.sha256.clone();
            let msg = finish_promotion(
                &mut s,
                new,
                facts.current_exists || !facts.new_tmp_exists,
                tries,
            );
            actions.push(format!("resumed an interrupted promotion: {msg}"));
            steps.push(Step::WriteState(Box::new(s.clone())));
            if matches!(&facts.staged, Staged::Ready(m) if m.sha256.eq_ignore_ascii_case(&sha)) {
                steps.push(Step::RemoveStaged);
            }
            return Plan {
                steps,
                actions,
                state: s,
            };
        }
        Some(Pending::Rollback { reason }) => {
            if facts.old_exists {
                steps.push(Step::RestoreOld);
            }
            let msg = finish_rollback(&mut s, &reason);
            actions.push(format!("resumed an interrupted rollback: {msg}"));
            steps.push(Step::WriteState(Box::new(s.clone())));
            return Plan {
                steps,
                actions,
                state: s,
            };
        }
        None => {}
    }

    // 2. Leftovers of a promotion that never reached its first state write.
    if facts.new_tmp_exists {
        steps.push(Step::RemoveNewTmp);
    }
    if facts.old_tmp_exists {
        steps.push(Step::RemoveOldTmp);
    }

    // 3. First boot: adopt the image that is there.
    if s.current.is_none() && facts.current_exists {
        let rec = facts.adopt.clone().unwrap_or_else(ImageRecord::unknown);
        let msg = format!(
            "adopted {} version {} as the current image",
            rec.name, rec.version
        );
        s.push_event(EventKind::Adopted, msg.clone());
        actions.push(msg);
        s.current = Some(rec);
        // An -old image means a promotion happened and its state is lost: whether the running
        // image was ever confirmed is unknown, so it is on trial again (rolled back to -old
        // unless marked good within `tries` boots).
        if facts.old_exists && s.trial.is_none() {
            let msg = format!(
                "no boot state but a previous image is there: version {} is on trial again",
                version_of(&s.current)
            );
            s.push_event(EventKind::Adopted, msg.clone());
            actions.push(msg);
            s.trial = Some(Trial { tries, used: 0 });
            s.old = Some(facts.adopt_old.clone().unwrap_or_else(ImageRecord::unknown));
        }
    }

    // 4. A committed staged image.
    match &facts.staged {
        Staged::Ready(m) => {
            let rec = ImageRecord::from_manifest(m);
            let cur = s.current.clone();
            let refuse = if cur
                .as_ref()
                .is_some_and(|c| c.sha256.eq_ignore_ascii_case(&rec.sha256))
            {
                Some(format!(
                    "staged version {} is already current; removed it",
                    rec.version
                ))
            } else if s.is_rejected(&rec.sha256) {
                Some(format!(
                    "staged version {} failed before; removed it",
                    rec.version
                ))
            } else if let Some(c) = cur
                .as_ref()
                .filter(|c| c.version > 0 && rec.version <= c.version)
            {
                Some(format!(
                    "staged version {} is not newer than current version {}; removed it",
                    rec.version, c.version
                ))
            } else {
                None
            };
            if let Some(msg) = refuse {
                if !msg.contains("already current") {
                    s.push_event(EventKind::StagedRejected, msg.clone());
                }
                actions.push(msg);
                steps.push(Step::RemoveStaged);
            } else {
                steps.push(Step::CopyStaged {
                    size: m.size,
                    sha256: rec.sha256.clone(),
                    verity: m.verity.clone(),
                });
                let mut mid = s.clone();
                mid.pending = Some(Pending::Promote { new: rec.clone() });
                steps.push(Step::WriteState(Box::new(mid)));
                if facts.current_exists {
                    steps.push(Step::KeepCurrentAsOld);
                }
                steps.push(Step::InstallNew);
                actions.push(finish_promotion(&mut s, rec, facts.current_exists, tries));
                steps.push(Step::WriteState(Box::new(s.clone())));
                steps.push(Step::RemoveStaged);
                return Plan {
                    steps,
                    actions,
                    state: s,
                };
            }
        }
        Staged::Invalid(why) => {
            let msg = format!("staged image refused: {why}; removed it");
            s.push_event(EventKind::StagedRejected, msg.clone());
            actions.push(msg);
            steps.push(Step::RemoveStaged);
        }
        Staged::None => {}
    }

    // 5. Trial accounting.
    if let Some(mut t) = s.trial {
        if t.used >= t.tries {
            let reason = format!(
                "version {} was not marked good within {} boots",
                version_of(&s.current),
                t.tries
            );
            if facts.old_exists {
                actions.push(rollback_into(&mut s, &mut steps, &reason));
            } else {
                s.trial = None;
                let msg = format!("{reason}, but there is no previous image; keeping it");
                s.push_event(EventKind::TrialExpiredNoFallback, msg.clone());
                actions.push(msg);
            }
        } else {
            t.used += 1;
            s.trial = Some(t);
            actions.push(format!("trial boot {} of {}", t.used, t.tries));
        }
    }

    // 6. A boot that changes nothing but the counter writes nothing: the image partition is
    // not written (nor worn) on every boot, and two fsyncs leave the boot path. Like
    // U-Boot's bootcount, boots are counted when something is at stake (trials) or changes.
    let mut unchanged = s.clone();
    unchanged.boot_count = state.boot_count;
    if steps.is_empty() && unchanged == *state {
        return Plan {
            steps,
            actions,
            state: state.clone(),
        };
    }
    steps.push(Step::WriteState(Box::new(s.clone())));
    Plan {
        steps,
        actions,
        state: s,
    }
}

/// Plans a rollback in this boot because the current image failed (`reason`); `None` when
/// there is no previous image to fall back to.
pub fn plan_rollback(state: &BootState, facts: &Facts, reason: &str) -> Option<Plan> {
    if !facts.old_exists {
        return None;
    }
    let mut s = state.clone();
    let mut steps = Vec::new();
    let msg = rollback_into(&mut s, &mut steps, reason);
    steps.push(Step::WriteState(Box::new(s.clone())));
    Some(Plan {
        steps,
        actions: vec![msg],
        state: s,
    })
}

/// Plans refusing a staged image whose copy failed verification (`reason`): the partial copy
/// and the staged slot are removed. The digest is not blacklisted: the staged bytes were
/// wrong, not the signed image, so a correct re-push may still be installed.
pub fn plan_reject_staged(state: &BootState, m: &Manifest, reason: &str) -> Plan {
    let mut s = state.clone();
    let msg = format!("staged version {} refused: {reason}; removed it", m.version);
    s.push_event(EventKind::StagedRejected, msg.clone());
    Plan {
        steps: vec![
            Step::RemoveNewTmp,
            Step::WriteState(Box::new(s.clone())),
            Step::RemoveStaged,
        ],
        actions: vec![msg],
        state: s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::manifest::MANIFEST_FORMAT;

    fn rec(v: u64) -> ImageRecord {
        ImageRecord {
            name: "demo".into(),
            version: v,
            sha256: format!("{v:064x}"),
            size: 100,
        }
    }

    fn manifest(v: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "demo".into(),
            version: v,
            size: 100,
            sha256: format!("{v:064x}"),
            created: 0,
            min_version: None,
            verity: None,
        }
    }

    fn good(v: u64) -> BootState {
        BootState {
            current: Some(rec(v)),
            boot_count: 5,
            ..Default::default()
        }
    }

    fn on_disk() -> Facts {
        Facts {
            current_exists: true,
            ..Default::default()
        }
    }

    #[test]
    fn plain_boot_writes_nothing_trial_boot_counts() {
        let p = plan(&good(1), &on_disk(), 3);
        assert_eq!(p.state, good(1));
        assert!(p.steps.is_empty(), "{:?}", p.steps);
        let mut trial = good(2);
        trial.trial = Some(Trial { tries: 3, used: 1 });
        let p = plan(&trial, &on_disk(), 3);
        assert_eq!(p.state.boot_count, 6);
        assert_eq!(p.state.trial.unwrap().used, 2);
        assert_eq!(p.steps, vec![Step::WriteState(Box::new(p.state.clone()))]);
    }

    #[test]
    fn first_boot_adopts() {
        let mut f = on_disk();
        f.adopt = Some(rec(1));
        let p = plan(&BootState::default(), &f, 3);
        assert_eq!(p.state.current, Some(rec(1)));
        assert_eq!(p.state.last_event().unwrap().kind, EventKind::Adopted);
        let p = plan(&BootState::default(), &on_disk(), 3);
        assert_eq!(p.state.current, Some(ImageRecord::unknown()));
    }

    #[test]
    fn promotion_steps_in_order() {
        let mut f = on_disk();
        f.old_exists = true;
        f.staged = Staged::Ready(manifest(2));
        let p = plan(&good(1), &f, 3);
        let kinds: Vec<&str> = p
            .steps
            .iter()
            .map(|s| match s {
                Step::CopyStaged { .. } => "copy",
                Step::WriteState(st) if st.pending.is_some() => "intent",
                Step::WriteState(_) => "state",
                Step::KeepCurrentAsOld => "keep-old",
                Step::InstallNew => "install",
                Step::RemoveStaged => "remove-staged",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "copy",
                "intent",
                "keep-old",
                "install",
                "state",
                "remove-staged"
            ]
        );
        assert_eq!(p.state.current, Some(rec(2)));
        assert_eq!(p.state.old, Some(rec(1)));
        assert_eq!(p.state.trial, Some(Trial { tries: 3, used: 1 }));
        assert_eq!(p.state.pending, None);
        match &p.steps[1] {
            Step::WriteState(st) => {
                assert_eq!(st.pending, Some(Pending::Promote { new: rec(2) }));
                assert_eq!(st.current, Some(rec(1)));
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn trial_runs_out_then_rolls_back() {
        let mut f = on_disk();
        f.old_exists = true;
        f.staged = Staged::Ready(manifest(2));
        let mut s = plan(&good(1), &f, 2).state;
        f.staged = Staged::None;
        // Boot 2 of 2.
        let p = plan(&s, &f, 2);
        assert_eq!(p.state.trial, Some(Trial { tries: 2, used: 2 }));
        s = p.state;
        // Boot 3: out of tries.
        let p = plan(&s, &f, 2);
        assert!(p.steps.contains(&Step::RestoreOld));
        assert_eq!(p.state.current, Some(rec(1)));
        assert_eq!(p.state.old, None);
        assert_eq!(p.state.trial, None);
        assert!(p.state.is_rejected(&rec(2).sha256));
        let ev = p.state.last_event().unwrap();
        assert_eq!(ev.kind, EventKind::RolledBack);
        assert!(
            ev.detail.contains("not marked good within 2 boots"),
            "{}",
            ev.detail
        );
        match &p.steps[0] {
            Step::WriteState(st) => assert!(matches!(st.pending, Some(Pending::Rollback { .. }))),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn marked_good_trial_stays() {
        let mut f = on_disk();
        f.old_exists = true;
        f.staged = Staged::Ready(manifest(2));
        let mut s = plan(&good(1), &f, 1).state;
        s.mark_good().unwrap();
        f.staged = Staged::None;
        for _ in 0..5 {
            s = plan(&s, &f, 1).state;
        }
        assert_eq!(s.current, Some(rec(2)));
        assert_eq!(s.old, Some(rec(1)));
    }

    #[test]
    fn expired_trial_without_old_keeps_current() {
        let mut s = good(2);
        s.trial = Some(Trial { tries: 1, used: 1 });
        let p = plan(&s, &on_disk(), 1);
        assert!(!p.steps.contains(&Step::RestoreOld));
        assert_eq!(p.state.trial, None);
        assert_eq!(
            p.state.last_event().unwrap().kind,
            EventKind::TrialExpiredNoFallback
        );
    }

    #[test]
    fn staged_refusals() {
        let mut f = on_disk();
        for (state, m, expect) in [
            (good(2), manifest(2), "already current"),
            (good(3), manifest(2), "not newer"),
            (
                {
                    let mut s = good(1);
                    s.reject(&manifest(2).sha256);
                    s
                },
                manifest(2),
                "failed before",
            ),
        ] {
            f.staged = Staged::Ready(m);
            let p = plan(&state, &f, 3);
            assert!(p.steps.contains(&Step::RemoveStaged));
            assert!(!p.steps.iter().any(|s| matches!(s, Step::CopyStaged { .. })));
            assert!(p.actions[0].contains(expect), "{:?}", p.actions);
            assert_eq!(p.state.current, state.current);
        }
        f.staged = Staged::Invalid("bad json".into());
        let p = plan(&good(1), &f, 3);
        assert_eq!(p.steps[0], Step::RemoveStaged);
        assert_eq!(
            p.state.last_event().unwrap().kind,
            EventKind::StagedRejected
        );
    }

    #[test]
    fn leftovers_are_removed() {
        let mut f = on_disk();
        f.new_tmp_exists = true;
        f.old_tmp_exists = true;
        let p = plan(&good(1), &f, 3);
        assert_eq!(p.steps[..2], [Step::RemoveNewTmp, Step::RemoveOldTmp]);
    }

    #[test]
    fn resume_promotion_before_and_after_install() {
        let mut s = good(1);
        s.pending = Some(Pending::Promote { new: rec(2) });
        let mut f = on_disk();
        f.new_tmp_exists = true;
        f.staged = Staged::Ready(manifest(2));
        let p = plan(&s, &f, 3);
        assert_eq!(p.steps[..2], [Step::KeepCurrentAsOld, Step::InstallNew]);
        assert_eq!(p.steps.last(), Some(&Step::RemoveStaged));
        assert_eq!(p.state.current, Some(rec(2)));
        assert_eq!(p.state.old, Some(rec(1)));
        f.new_tmp_exists = false;
        let p = plan(&s, &f, 3);
        assert!(matches!(p.steps[0], Step::WriteState(_)));
        assert_eq!(p.state.current, Some(rec(2)));
        assert_eq!(p.state.old, Some(rec(1)));
    }

    #[test]
    fn resume_rollback_before_and_after_rename() {
        let mut s = good(2);
        s.old = Some(rec(1));
        s.trial = Some(Trial { tries: 3, used: 3 });
        s.pending = Some(Pending::Rollback { reason: "x".into() });
        let mut f = on_disk();
        f.old_exists = true;
        let p = plan(&s, &f, 3);
        assert_eq!(p.steps[0], Step::RestoreOld);
        assert_eq!(p.state.current, Some(rec(1)));
        f.old_exists = false;
        let p = plan(&s, &f, 3);
        assert!(matches!(p.steps[0], Step::WriteState(_)));
        assert_eq!(p.state.current, Some(rec(1)));
        assert!(p.state.pending.is_none());
    }

    #[test]
    fn rollback_on_mount_failure_and_reject() {
        let mut s = good(2);
        s.old = Some(rec(1));
        let mut f = on_disk();
        assert!(plan_rollback(&s, &f, "x").is_none());
        f.old_exists = true;
        let p = plan_rollback(&s, &f, "image does not mount").unwrap();
        assert_eq!(p.state.current, Some(rec(1)));
        assert!(p.actions[0].contains("does not mount"));
        let p = plan_reject_staged(&good(1), &manifest(2), "hash mismatch");
        assert!(!p.state.is_rejected(&manifest(2).sha256));
        assert_eq!(p.steps[0], Step::RemoveNewTmp);
        assert_eq!(p.steps.last(), Some(&Step::RemoveStaged));
    }

    /// Every transition from every combination of facts leaves a current image planned.
    #[test]
    fn every_plan_ends_with_a_current_image() {
        let states = {
            let mut v = vec![BootState::default(), good(1)];
            let mut t = good(2);
            t.old = Some(rec(1));
            t.trial = Some(Trial { tries: 2, used: 2 });
            v.push(t.clone());
            t.pending = Some(Pending::Promote { new: rec(3) });
            v.push(t.clone());
            t.pending = Some(Pending::Rollback { reason: "r".into() });
            v.push(t);
            v
        };
        for st in &states {
            for bits in 0..16u8 {
                for staged in [
                    Staged::None,
                    Staged::Ready(manifest(5)),
                    Staged::Invalid("x".into()),
                ] {
                    let f = Facts {
                        current_exists: bits & 1 != 0,
                        old_exists: bits & 2 != 0,
                        new_tmp_exists: bits & 4 != 0,
                        old_tmp_exists: bits & 8 != 0,
                        staged,
                        adopt: None,
                        adopt_old: None,
                    };
                    let p = plan(st, &f, 3);
                    assert!(p.state.pending.is_none(), "{st:?} {f:?}");
                    // The last state written is the plan's; a plan that writes none
                    // changed nothing.
                    match p
                        .steps
                        .iter()
                        .rev()
                        .find(|s| matches!(s, Step::WriteState(_)))
                    {
                        Some(Step::WriteState(x)) => assert_eq!(**x, p.state),
                        _ => assert!(p.steps.is_empty() && p.state == *st, "{st:?} {f:?}"),
                    }
                    let resumes = matches!(st.pending, Some(Pending::Promote { .. }));
                    if f.current_exists || (resumes && f.new_tmp_exists) {
                        assert!(p.state.current.is_some(), "{st:?} {f:?}");
                    }
                }
            }
        }
    }
}
