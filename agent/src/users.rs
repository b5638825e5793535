//! `/etc/passwd` and `/etc/group` lookups for `exec --user` and an image's `User`, parsed here
//! (a static binary has no NSS).

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

/// Finds a group (a name, or a number) in `group` text and gives its id. A number is a group
/// id whether or not it is listed.
pub fn group_id(group: &str, which: &str) -> Option<u32> {
    if let Ok(gid) = which.parse::<u32>() {
        return Some(gid);
    }
    group.lines().find_map(|line| {
        let mut f = line.split(':');
        let (name, _, gid) = (f.next()?, f.next()?, f.next()?);
        (name == which).then(|| gid.parse().ok()).flatten()
    })
}

/// The account an OCI image's `User` names — `USER`, `UID`, `USER:GROUP` or `UID:GID`, each
/// part a name or a number — from `passwd` and `group` text; its gid is the named group's when
/// one is given. The error says which part is not there.
pub fn resolve(passwd: &str, group: &str, spec: &str) -> Result<User, String> {
    let (who, grp) = spec
        .split_once(':')
        .map_or((spec, None), |(u, g)| (u, Some(g)));
    let mut user =
        lookup(passwd, who).ok_or_else(|| format!("user {who:?} is not in /etc/passwd"))?;
    if let Some(g) = grp {
        user.gid = group_id(group, g).ok_or_else(|| format!("group {g:?} is not in /etc/group"))?;
    }
    Ok(user)
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

    const GROUP: &str = "root:x:0:\n\
                         short\n\
                         users:x:100:\n\
                         staff:x:50:app,other\n";

    #[test]
    fn groups_by_name_and_number() {
        assert_eq!(group_id(GROUP, "staff"), Some(50));
        assert_eq!(group_id(GROUP, "77"), Some(77));
        assert_eq!(group_id(GROUP, "short"), None);
        assert_eq!(group_id(GROUP, "wheel"), None);
    }

    #[test]
    fn an_image_user_with_and_without_its_group() {
        let gid = |spec| resolve(PASSWD, GROUP, spec).map(|u| (u.uid, u.gid));
        assert_eq!(gid("app"), Ok((1000, 100)));
        assert_eq!(gid("app:staff"), Ok((1000, 50)));
        assert_eq!(gid("1000:7"), Ok((1000, 7)));
        assert_eq!(gid("4242:staff"), Ok((4242, 50)));
        assert_eq!(
            gid("app:wheel"),
            Err("group \"wheel\" is not in /etc/group".into())
        );
        assert_eq!(
            gid("nobody:staff"),
            Err("user \"nobody\" is not in /etc/passwd".into())
        );
    }
}
