//! `modules.dep` (pure): which `.ko` files to load, in which order, for the modules named by
//! `modules=` — used by initstage to load them and by `keelctl initramfs` to pack them.

use std::collections::{HashMap, HashSet};

/// Module names compare with `-` and `_` as the same character.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// A module's name from its path in `modules.dep` (`kernel/fs/erofs/erofs.ko.xz` → `erofs`).
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    normalize(base)
}

/// Parsed `modules.dep`: module name → (its path, its dependencies' paths as listed).
#[derive(Debug, Default, Clone)]
pub struct ModuleDeps {
    map: HashMap<String, (String, Vec<String>)>,
}

impl ModuleDeps {
    /// Parses `modules.dep` text.
    pub fn parse(text: &str) -> Self {
        let mut map = HashMap::new();
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else {
                continue;
            };
            let module = module.trim();
            if module.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            map.insert(name_of(module), (module.to_string(), deps));
        }
        ModuleDeps { map }
    }

    /// The paths of everything a module (named by its path or name) needs loaded first: the
    /// whole closure, as `modules.dep` lists it. Empty for an unknown module.
    pub fn deps_of(&self, module: &str) -> &[String] {
        self.map
            .get(&name_of(module))
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[])
    }

    /// The path of a module, relative to the modules directory.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.map.get(&normalize(name)).map(|(p, _)| p.as_str())
    }
}

/// Orders the `.ko` files to load for `wanted` (dependencies first). Names in `builtin` or
/// `loaded` are skipped; a name that is none of these and not in `deps` is reported.
pub fn resolve(
    wanted: &[String],
    deps: &ModuleDeps,
    builtin: &HashSet<String>,
    loaded: &HashSet<String>,
) -> (Vec<String>, Vec<String>) {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut missing = Vec::new();
    for w in wanted {
        let n = normalize(w);
        if builtin.contains(&n) || loaded.contains(&n) {
            continue;
        }
        let Some((path, dlist)) = deps.map.get(&n) else {
            missing.push(w.clone());
            continue;
        };
        // modules.dep lists the full closure, the deepest dependency last.
        for d in dlist.iter().rev() {
            let dn = name_of(d);
            if !builtin.contains(&dn) && !loaded.contains(&dn) && seen.insert(dn) {
                order.push(d.clone());
            }
        }
        if seen.insert(n) {
            order.push(path.clone());
        }
    }
    (order, missing)
}

/// Names from `modules.builtin` (paths, one a line).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(name_of)
        .collect()
}

/// Names from `/proc/modules`.
pub fn parse_proc_modules(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(normalize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/fs/overlayfs/overlay.ko:\n\
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko\n\
kernel/lib/libcrc32c.ko:\n";

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dependencies_first_each_once() {
        let d = ModuleDeps::parse(DEP);
        let want = vec!["virtio_blk".to_string(), "virtio".into(), "overlay".into()];
        let (order, missing) = resolve(&want, &d, &set(&[]), &set(&[]));
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/fs/overlayfs/overlay.ko"
            ]
        );
        assert!(missing.is_empty());
    }

    #[test]
    fn builtin_loaded_and_missing() {
        let d = ModuleDeps::parse(DEP);
        let want = vec![
            "virtio-blk".to_string(),
            "squashfs".into(),
            "erofs".into(),
            "ext4".into(),
        ];
        let (order, missing) = resolve(&want, &d, &set(&["ext4"]), &set(&["virtio_ring"]));
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/erofs/erofs.ko.xz"
            ]
        );
        assert_eq!(missing, ["squashfs"]);
        assert_eq!(d.path("erofs"), Some("kernel/fs/erofs/erofs.ko.xz"));
    }

    #[test]
    fn proc_modules_and_builtin_parse() {
        assert_eq!(
            parse_proc_modules("loop 32768 0 - Live 0x0\nvirtio_blk 1 0 - Live 0x0\n"),
            set(&["loop", "virtio_blk"])
        );
        assert_eq!(parse_builtin("kernel/fs/ext4/ext4.ko\n\n"), set(&["ext4"]));
    }
}
