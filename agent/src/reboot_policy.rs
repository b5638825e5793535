//! When a pulled image is booted: `[pull] reboot = "never" | "staged" | "window HH:MM-HH:MM"`
//! (UTC; a window may cross midnight). Pure: [`RebootPolicy::parse`] and
//! [`RebootPolicy::delay`] from the time of day; [`crate::pull`] waits and reboots.

use std::time::Duration;

/// Seconds in a day.
const DAY: u32 = 86_400;

/// What pull mode does once it staged an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootPolicy {
    /// Nothing: the image is installed at whatever next boot comes.
    Never,
    /// Reboot at once.
    Staged,
    /// Reboot at once inside the window, else at its next start (seconds of the UTC day,
    /// start inclusive, end exclusive).
    Window {
        /// Start, seconds after 00:00 UTC.
        start: u32,
        /// End, seconds after 00:00 UTC.
        end: u32,
    },
}

fn hh_mm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.trim().len() == 5).then_some(h * 3600 + m * 60)
}

impl RebootPolicy {
    /// Parses the `reboot` key.
    pub fn parse(s: &str) -> Result<RebootPolicy, String> {
        match s.trim() {
            "never" => Ok(RebootPolicy::Never),
            "staged" => Ok(RebootPolicy::Staged),
            w => {
                let bad = || {
                    format!(
                        "reboot = {s:?}: expected \"never\", \"staged\" or \"window HH:MM-HH:MM\" (UTC)"
                    )
                };
                let range = w.strip_prefix("window ").ok_or_else(bad)?;
                let (a, b) = range.split_once('-').ok_or_else(bad)?;
                let (start, end) = (hh_mm(a).ok_or_else(bad)?, hh_mm(b).ok_or_else(bad)?);
                if start == end {
                    return Err(format!("reboot = {s:?}: the window is empty"));
                }
                Ok(RebootPolicy::Window { start, end })
            }
        }
    }

    /// How long after staging to reboot, at `now` seconds into the UTC day; `None`: never.
    pub fn delay(&self, now: u32) -> Option<Duration> {
        let now = now % DAY;
        match *self {
            RebootPolicy::Never => None,
            RebootPolicy::Staged => Some(Duration::ZERO),
            RebootPolicy::Window { start, end } => {
                let inside = if start < end {
                    now >= start && now < end
                } else {
                    now >= start || now < end
                };
                let wait = if inside { 0 } else { (start + DAY - now) % DAY };
                Some(Duration::from_secs(u64::from(wait)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_wait_for_their_window() {
        assert_eq!(RebootPolicy::parse("never"), Ok(RebootPolicy::Never));
        assert_eq!(RebootPolicy::Never.delay(0), None);
        assert_eq!(RebootPolicy::Staged.delay(5000), Some(Duration::ZERO));
        let w = RebootPolicy::parse("window 02:00-04:30").unwrap();
        assert_eq!(
            w,
            RebootPolicy::Window {
                start: 7200,
                end: 16200
            }
        );
        let h = |h: u32| h * 3600;
        assert_eq!(w.delay(h(3)), Some(Duration::ZERO));
        assert_eq!(w.delay(h(1)), Some(Duration::from_secs(3600)));
        assert_eq!(w.delay(h(5)), Some(Duration::from_secs(u64::from(h(21)))));
        // Across midnight.
        let n = RebootPolicy::parse("window 23:00-01:00").unwrap();
        assert_eq!(n.delay(h(0)), Some(Duration::ZERO));
        assert_eq!(n.delay(h(23) + 60), Some(Duration::ZERO));
        assert_eq!(n.delay(h(1)), Some(Duration::from_secs(u64::from(h(22)))));
        for bad in [
            "sometimes",
            "window 2:00-04:00",
            "window 25:00-01:00",
            "window 01:00",
            "window 01:00-01:00",
        ] {
            assert!(RebootPolicy::parse(bad).is_err(), "{bad}");
        }
    }
}
