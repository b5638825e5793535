//! `/etc/passwd` lookups for `exec --user`, parsed here (a static binary has no NSS).

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its home directory.
    pub home: String,
}

/// Finds `who` (a name, or a number) in `passwd` text. A number that has no entry is still
/// a user: its group is the same number and its home `/`.
pub fn lookup(passwd: &str, who: &str) -> Option<User> {
    let numeric = who.parse::<u32>().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == who || numeric == Some(uid) {
            return Some(User {
                name: f[0].to_string(),
                uid,
                gid,
                home: f[5].to_string(),
            });
        }
    }
    numeric.map(|uid| User {
        name: who.to_string(),
        uid,
        gid: uid,
        home: "/".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          broken line\n\
                          app:x:1000:100:App:/home/app:/bin/sh\n";

    #[test]
    fn by_name_by_number_and_unknown() {
        let app = lookup(PASSWD, "app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 100, "/home/app")
        );
        assert_eq!(lookup(PASSWD, "1000").unwrap().name, "app");
        assert_eq!(lookup(PASSWD, "0").unwrap().home, "/root");
        let n = lookup(PASSWD, "4242").unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 4242, "/"));
        assert_eq!(lookup(PASSWD, "nobody"), None);
    }
}
