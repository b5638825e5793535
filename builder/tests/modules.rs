//! Compressed modules in the initramfs: unpacked to `.ko` by default with their modules.dep
//! lines rewritten, kept as they are with `keep_compressed`, a corrupt one named.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_build::initramfs::{entries, unpacked_dep_line, Node, Spec};

fn tree(tag: &str) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let root = std::env::temp_dir().join(format!("keel-build-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let kdir = root.join("lib/modules/6.1.0-test");
    fs::create_dir_all(kdir.join("kernel")).unwrap();
    let mut plain = Vec::new();
    for (name, tool) in [("a", "xz"), ("b", "gzip"), ("c", "zstd")] {
        let data = format!("\x7fELF module {name} ").repeat(5000).into_bytes();
        let p = kdir.join(format!("kernel/{name}.ko"));
        fs::write(&p, &data).unwrap();
        let st = Command::new(tool).arg("-q").arg(&p).status().unwrap();
        assert!(st.success(), "{tool}");
        plain.push((name.to_string(), data));
    }
    fs::write(
        kdir.join("modules.dep"),
        "kernel/a.ko.xz: kernel/b.ko.gz kernel/c.ko.zst\nkernel/b.ko.gz: kernel/c.ko.zst\nkernel/c.ko.zst:\n",
    )
    .unwrap();
    fs::write(kdir.join("modules.builtin"), "").unwrap();
    fs::write(root.join("init"), b"#!init").unwrap();
    (kdir, plain)
}

fn spec(kdir: &Path, keep: bool) -> Spec {
    Spec {
        init: kdir.join("../../../init"),
        kernel_modules: Some(kdir.to_path_buf()),
        modules: vec!["a".into()],
        keys: None,
        files: Vec::new(),
        keep_compressed: keep,
    }
}

fn file<'a>(e: &'a [(String, Node)], path: &str) -> Option<&'a [u8]> {
    e.iter().find_map(|(p, n)| match n {
        Node::File { data, .. } if p == path => Some(&data[..]),
        _ => None,
    })
}

#[test]
fn compressed_modules_are_unpacked_with_their_dependency_lines() {
    let (kdir, plain) = tree("unpack");
    let (e, packed) = entries(&spec(&kdir, false)).unwrap();
    let base = "lib/modules/6.1.0-test";
    for (name, data) in &plain {
        let got = file(&e, &format!("{base}/kernel/{name}.ko"))
            .unwrap_or_else(|| panic!("{name}.ko not packed"));
        assert!(got == &data[..], "{name}.ko differs from the original");
    }
    assert_eq!(packed.unpacked, [1, 1, 1]);
    assert_eq!(packed.kept_zstd, 0);
    assert_eq!(packed.modules, ["c", "b", "a"]);
    let dep =
        String::from_utf8(file(&e, &format!("{base}/modules.dep")).unwrap().to_vec()).unwrap();
    assert_eq!(
        dep,
        "kernel/c.ko:\nkernel/b.ko: kernel/c.ko\nkernel/a.ko: kernel/b.ko kernel/c.ko\n"
    );
    let _ = fs::remove_dir_all(kdir.ancestors().nth(3).unwrap());
}

#[test]
fn keep_compressed_packs_them_as_they_are_and_counts_zstd() {
    let (kdir, _) = tree("keep");
    let (e, packed) = entries(&spec(&kdir, true)).unwrap();
    let base = "lib/modules/6.1.0-test";
    for f in ["a.ko.xz", "b.ko.gz", "c.ko.zst"] {
        let want = fs::read(kdir.join("kernel").join(f)).unwrap();
        assert_eq!(
            file(&e, &format!("{base}/kernel/{f}")),
            Some(&want[..]),
            "{f}"
        );
    }
    assert_eq!(packed.unpacked, [0, 0, 0]);
    assert_eq!(packed.kept_zstd, 1);
    let dep =
        String::from_utf8(file(&e, &format!("{base}/modules.dep")).unwrap().to_vec()).unwrap();
    assert!(
        dep.contains("kernel/a.ko.xz: kernel/b.ko.gz kernel/c.ko.zst"),
        "{dep}"
    );
    let _ = fs::remove_dir_all(kdir.ancestors().nth(3).unwrap());
}

#[test]
fn a_corrupt_compressed_module_is_named_and_nothing_is_written() {
    let (kdir, _) = tree("corrupt");
    let p = kdir.join("kernel/b.ko.gz");
    let mut bad = fs::read(&p).unwrap();
    let n = bad.len();
    bad.truncate(n - 6);
    fs::write(&p, &bad).unwrap();
    let out = kdir.join("out.cpio.gz");
    let e =
        keel_build::initramfs::build(&spec(&kdir, false), &out, Default::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("b.ko.gz") && msg.contains("truncated gzip data"),
        "{msg}"
    );
    assert!(!out.exists() && !out.with_extension("tmp").exists());
    let _ = fs::remove_dir_all(kdir.ancestors().nth(3).unwrap());
}

#[test]
fn dependency_lines_lose_every_suffix() {
    assert_eq!(unpacked_dep_line("kernel/x.ko.zst:"), "kernel/x.ko:");
    assert_eq!(
        unpacked_dep_line("kernel/x.ko: kernel/y.ko.xz"),
        "kernel/x.ko: kernel/y.ko"
    );
}
