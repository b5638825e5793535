//! `initstage`: PID 1 of keel's initramfs, or `initstage prepare` for tests and
//! systemd-in-initrd setups. See the README for the boot flow and every option.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use initstage::boot::{self, Options};
use initstage::mountplan::Layout;
use initstage::probe::Scope;
use initstage::{cmdline, failpoint, kmsg, pid1};

const USAGE: &str = "usage:
  initstage                       run as /init (PID 1)
  initstage prepare --sysroot DIR [--cmdline FILE] [--run-dir DIR] [--devices DISK[,DISK]]
                    [--keys PEM] [--modules-dir DIR]
      find partitions, promote/roll back, mount the image and overlay at DIR, write
      <run-dir>/boot.json, and stop before switch_root
  initstage clean-trash DIR       empty an overlay partition's .trash (old upper layers)
  initstage --version";

struct PrepareArgs {
    sysroot: PathBuf,
    cmdline: PathBuf,
    run_dir: PathBuf,
    devices: Option<Vec<String>>,
    keys: Option<PathBuf>,
    modules_dir: Option<PathBuf>,
}

fn parse_prepare(args: &[String]) -> Result<PrepareArgs, String> {
    let mut p = PrepareArgs {
        sysroot: PathBuf::new(),
        cmdline: "/proc/cmdline".into(),
        run_dir: pid1::RUN_DIR.into(),
        devices: None,
        keys: None,
        modules_dir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--sysroot" => p.sysroot = val()?.into(),
            "--cmdline" => p.cmdline = val()?.into(),
            "--run-dir" => p.run_dir = val()?.into(),
            "--devices" => {
                p.devices = Some(
                    val()?
                        .split(',')
                        .map(|d| d.trim_start_matches("/dev/").to_string())
                        .collect(),
                )
            }
            "--keys" => p.keys = Some(val()?.into()),
            "--modules-dir" => p.modules_dir = Some(val()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if p.sysroot.as_os_str().is_empty() {
        return Err("--sysroot is required".into());
    }
    Ok(p)
}

fn prepare(args: &[String]) -> Result<(), String> {
    let p = parse_prepare(args)?;
    let line = std::fs::read_to_string(&p.cmdline)
        .map_err(|e| format!("cannot read {}: {e}", p.cmdline.display()))?;
    let (cfg, warnings) = cmdline::parse(&line);
    for w in &warnings {
        log::warn!("{w}");
    }
    failpoint::arm(cfg.failpoint);
    let modules_pending = match &p.modules_dir {
        Some(dir) => initstage::modules::load_all(dir, &cfg.modules).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let keys = match &p.keys {
        Some(k) => {
            let pem = std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?;
            keel_proto::manifest::public_keys_from_pem(&pem)
                .map_err(|e| format!("{}: {e}", k.display()))?
        }
        None => Vec::new(),
    };
    let opts = Options {
        cfg,
        layout: Layout {
            run: p.run_dir,
            sysroot: p.sysroot,
        },
        scope: p.devices.map(Scope::Disks).unwrap_or(Scope::All),
        keys,
        keys_error: None,
        modules_pending,
    };
    boot::prepare(&opts).map(|_| ()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if rustix::process::getpid().is_init() {
        pid1::run(args);
    }
    kmsg::init();
    let r = match args.get(1).map(String::as_str) {
        Some("prepare") => prepare(&args[2..]),
        Some("clean-trash") => match args.get(2) {
            Some(d) => boot::clean_trash(Path::new(d)).map_err(|e| format!("{d}: {e}")),
            None => Err(USAGE.into()),
        },
        Some("--version") => {
            println!("initstage {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("-h") | Some("--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
