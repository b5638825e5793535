//! `keelctl`: keys, signing, and talking to keel-agent over TCP, Unix sockets, vsock and
//! hybrid vsock. One file per command under `cmd/`; the client is the `keelctl` library.
//!
//! Exit codes: 0 done (or stdout closed by its reader), 1 the command failed (the message
//! says why), 2 bad usage (clap); `exec` exits with the remote process's code (see
//! `cmd/exec.rs`).

mod cmd;
mod progress;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keel_build::compress::Compression;
use keel_build::initramfs::Spec;
use keel_proto::message::Request;
use keelctl::client::{Client, Dial};
use keelctl::known::Trust;
use keelctl::Endpoint;

/// keel's host-side tool.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Agent endpoint: tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT, hvsock:///PATH:PORT.
    #[arg(
        long,
        short = 'e',
        env = "KEEL_ENDPOINT",
        default_value = "unix:///run/keel/agent.sock",
        global = true
    )]
    endpoint: String,
    /// Seconds any single read or write may take.
    #[arg(long, default_value_t = 30, global = true)]
    io_timeout: u64,
    /// Private key (PEM) that authenticates this session to the agent, for exec and remote
    /// control; the agent must list its public half in [exec] authorized_keys.
    #[arg(long, env = "KEEL_KEY", global = true)]
    key: Option<PathBuf>,
    /// Seconds to keep retrying the connection (the agent or guest may not listen yet).
    #[arg(long, default_value_t = 10, global = true)]
    wait: u64,
    /// On TCP, accept only this agent key (a PEM public key: the agent's identity.pem.pub).
    /// Without it the key is trusted on first use and remembered in --known-agents.
    #[arg(long, env = "KEEL_AGENT_KEY", global = true)]
    agent_key: Option<PathBuf>,
    /// Where agent keys are remembered [default: $XDG_CONFIG_HOME/keel/known_agents or
    /// ~/.config/keel/known_agents].
    #[arg(long, env = "KEEL_KNOWN_AGENTS", global = true)]
    known_agents: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Makes an ed25519 key pair: KEY (PKCS#8 PEM, mode 0600) and KEY.pub (SPKI PEM).
    Keygen {
        /// Private key file to write.
        key: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Writes the signed manifest of IMAGE (default: IMAGE.manifest).
    Sign {
        /// The image file.
        image: PathBuf,
        /// Private key (PEM, as `openssl genpkey -algorithm ed25519` writes).
        #[arg(long)]
        key: PathBuf,
        /// Product name.
        #[arg(long)]
        name: String,
        /// Image version (a positive integer, higher is newer).
        #[arg(long)]
        version: u64,
        /// Devices must run at least this version to install it.
        #[arg(long)]
        min_version: Option<u64>,
        /// Creation time (Unix seconds; default now).
        #[arg(long)]
        created: Option<u64>,
        /// Output file.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Append a dm-verity hash tree to IMAGE (in place) and sign its root hash: the
        /// device then checks every block it reads (manifest format 2).
        #[arg(long)]
        verity: bool,
        /// Do not write the chunk index (IMAGE.chunks) that delta pushes and pulls use.
        #[arg(long)]
        no_chunks: bool,
        /// Chunk sizes of the index: MIN:AVG:MAX or AVG (bytes, K or M; AVG a power of two).
        #[arg(long, default_value = "8K:16K:64K", value_parser = cmd::sign::parse_chunk_size)]
        chunk_size: keel_proto::chunks::Params,
    },
    /// Checks a manifest's signature and, with the image, its size and digest.
    Verify {
        /// The image file (its manifest defaults to IMAGE.manifest).
        image: PathBuf,
        /// Trusted public keys (PEM; several blocks allowed).
        #[arg(long)]
        keys: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Builds a root image from a container image: its layers checked and applied
    /// (whiteouts, owners, modes, xattrs), files injected, packed reproducibly.
    Build {
        /// The image: docker://HOST[:PORT]/REPO[:TAG|@sha256:…], oci:DIR[:TAG],
        /// docker-archive:FILE.tar (docker save) or dir:PATH.
        #[arg(long)]
        from: String,
        /// Plain HTTP to the registry (a local one).
        #[arg(long)]
        insecure: bool,
        /// USER:PASS for the registry (basic auth, or to get a bearer token).
        #[arg(long, env = "KEEL_REGISTRY_CREDS", hide_env_values = true)]
        creds: Option<String>,
        /// The output file.
        #[arg(long, short = 'o')]
        out: PathBuf,
        /// squashfs, erofs or initramfs.
        #[arg(long, default_value = "squashfs")]
        format: String,
        /// With --format initramfs: gzip (the default; any kernel) or zstd (CONFIG_RD_ZSTD,
        /// faster to unpack).
        #[arg(long)]
        compress: Option<Compression>,
        /// SRC:/DST: a file to add (repeatable).
        #[arg(long)]
        inject: Vec<String>,
        /// The keel-agent binary to add at /usr/sbin/keel-agent (with --format initramfs, it
        /// is the image's init).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A kernel's lib/modules/<version> directory: pack --modules (and their
        /// dependencies, unpacked to .ko) for keel's init to load at boot.
        #[arg(long, requires = "modules")]
        kernel_modules: Option<PathBuf>,
        /// Modules to pack and load (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "kernel_modules")]
        modules: Vec<String>,
        /// The platform to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Sign the image with this private key (PEM), with --name and --version.
        #[arg(long, requires_all = ["name", "version"])]
        sign: Option<PathBuf>,
        /// Product name (with --sign).
        #[arg(long)]
        name: Option<String>,
        /// Image version (with --sign).
        #[arg(long)]
        version: Option<u64>,
        /// With --sign: append a dm-verity hash tree and sign its root hash (root images).
        #[arg(long, requires = "sign")]
        verity: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Factory disks.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// Writes IMAGE and its manifest into a pull channel folder for any web server, CDN or
    /// bucket: the image under its digest first, then manifest.json.
    Publish {
        /// The image file (its manifest defaults to IMAGE.manifest).
        image: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The channel folder (created if missing).
        #[arg(long)]
        channel: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sends IMAGE to the agent, which verifies and stages it; resumes after a cut.
    Push {
        /// The image file (its manifest defaults to IMAGE.manifest).
        image: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Reconnect and resume this many times after a lost connection.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Send the whole image even when IMAGE.chunks allows a delta.
        #[arg(long)]
        no_delta: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows what the device runs, holds and did.
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Records files, directories and symlinks of the running system (or, with --remove,
    /// their removal) for the overlay's persistent/ layer: initstage applies them at the next
    /// boot, before the layer is mounted. On the device, as root.
    Persist {
        /// Absolute paths as the running system sees them; a directory with everything in it.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Remove these paths from persistent/ instead (the image's own files, if any, show
        /// again).
        #[arg(long)]
        remove: bool,
        /// initstage's run directory (boot.json, the overlay partition's mount).
        #[arg(long, default_value = "/run/keel")]
        run_dir: PathBuf,
        /// Read the paths from this tree instead of the running root.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ends the booted image's trial (root on the device's Unix socket, or --key).
    MarkGood,
    /// Reboots the device (root on the device's Unix socket, or --key).
    Reboot,
    /// Drops the staged image and any partial upload (root on the device's Unix socket, or
    /// --key).
    Unstage,
    /// Makes the agent poll its pull channel now (root on the device's Unix socket, or
    /// --key).
    PullNow,
    /// Copies a file into or out of the guest: `keelctl cp app.tar :/srv/app.tar`, `keelctl
    /// cp :/var/log/app.log .` (needs --key, or root on the Unix socket).
    Cp {
        /// Source (`:PATH` for a guest path).
        src: String,
        /// Destination (`:PATH` for a guest path).
        dst: String,
    },
    /// Lists the processes exec started (id, pid, state, command).
    Ps {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Watches a process again (after --detach or a lost connection): what it wrote
    /// meanwhile first, then the rest; exits with its code.
    Attach {
        /// Its id (keelctl ps).
        id: u64,
    },
    /// Sends a signal to a process's group.
    Kill {
        /// Its id (keelctl ps).
        id: u64,
        /// The signal: a name (TERM, SIGKILL, ...) or a number.
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
    },
    /// Runs CMD in the guest: its stdout and stderr on ours, stdin forwarded (with -i or -t,
    /// or when stdin is not a terminal), Ctrl-C and SIGTERM forwarded; exits with its code
    /// (128+N for signal N, 127 if it could not start, 255 if refused).
    Exec {
        /// Forward stdin even from a terminal.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run on a pseudo-terminal (the local terminal in raw mode, its size and resizes
        /// forwarded; stdout and stderr are then one stream).
        #[arg(short = 't', long)]
        tty: bool,
        /// Environment variable for the process, K=V (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Run as this guest user (name or uid).
        #[arg(long)]
        user: Option<String>,
        /// Kill the process group after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Print the process's id and return; it runs on without a client (see attach, kill).
        #[arg(long, conflicts_with_all = ["interactive", "tty"])]
        detach: bool,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        argv: Vec<String>,
    },
    /// Builds an initramfs: initstage as /init, kernel modules with their dependencies, keys.
    Initramfs {
        /// The static initstage binary.
        #[arg(long)]
        init: PathBuf,
        /// A kernel's lib/modules/<version> directory (with modules.dep).
        #[arg(long)]
        kernel_modules: Option<PathBuf>,
        /// Modules to include (comma-separated; dependencies are added).
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
        /// Trusted public keys (PEM) for /etc/keel/trusted.pem.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Extra file, SRC:PATH-IN-INITRAMFS (repeatable).
        #[arg(long = "file")]
        files: Vec<String>,
        /// Pack .ko.gz/.ko.xz/.ko.zst modules as they are (for a kernel that decompresses
        /// modules itself); by default they are unpacked to .ko.
        #[arg(long)]
        keep_compressed: bool,
        /// gzip (any kernel) or zstd (CONFIG_RD_ZSTD, faster to unpack).
        #[arg(long, default_value = "gzip")]
        compress: Compression,
        /// Output (compressed cpio newc).
        #[arg(long, short = 'o')]
        out: PathBuf,
    },
    /// Listens on tcp://HOST:PORT or unix:///PATH for an agent's ready announce and prints it.
    WaitReady {
        /// Where to listen.
        listen: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        within: u64,
    },
}

/// `keelctl disk …`.
#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Writes a GPT disk image with the img, overlay, newimg (and boot) partitions initstage
    /// looks for, IMAGE and its manifest on img (adopted as the current image at first boot).
    Create {
        /// The disk image to write.
        out: PathBuf,
        /// The root image (signed: its manifest defaults to IMAGE.manifest).
        #[arg(long)]
        image: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Size of img (default: twice the image, plus 16 MiB).
        #[arg(long)]
        img_size: Option<String>,
        /// Size of overlay (default 64M).
        #[arg(long)]
        overlay_size: Option<String>,
        /// Size of newimg (default: the image plus 16 MiB).
        #[arg(long)]
        newimg_size: Option<String>,
        /// The whole disk (overlay takes what the others leave).
        #[arg(long)]
        size: Option<String>,
        /// A folder to put on a boot partition (kernel, initramfs).
        #[arg(long)]
        boot: Option<PathBuf>,
        /// Size of boot (default 64M).
        #[arg(long)]
        boot_size: Option<String>,
        /// Print the layout as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args = Args::parse();
    if std::env::var_os("KEEL_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    }
    if let Err(e) = run(args) {
        if e.is::<cmd::StdoutClosed>() {
            std::process::exit(0);
        }
        eprintln!("keelctl: {e:#}");
        std::process::exit(1);
    }
}

fn endpoint(a: &Args) -> anyhow::Result<Endpoint> {
    Ok(a.endpoint.parse::<Endpoint>()?)
}

fn dial(a: &Args) -> anyhow::Result<Dial> {
    let trust = match &a.agent_key {
        Some(p) => Trust::pinned_from_file(p)?,
        // Only TLS (tcp://) reads it: keel-mark-good.service, with no $HOME, talks over
        // the Unix socket.
        None => match a.known_agents.clone().or_else(keelctl::known::default_path) {
            Some(p) => Trust::Remembered(p),
            None => Trust::NoFile,
        },
    };
    Ok(Dial {
        wait: Duration::from_secs(a.wait),
        timeout: Duration::from_secs(a.io_timeout),
        trust,
    })
}

fn connect(a: &Args) -> anyhow::Result<Client> {
    let ep = endpoint(a)?;
    let mut c = Client::connect(&ep, &dial(a)?)?;
    if let Some(k) = &a.key {
        let pem = std::fs::read_to_string(k).with_context(|| format!("--key {}", k.display()))?;
        let key = keel_proto::manifest::signing_key_from_pem(&pem)
            .with_context(|| format!("--key {}", k.display()))?;
        c.authenticate(&key)
            .with_context(|| format!("authenticate with --key {}", k.display()))?;
    }
    Ok(c)
}

fn run(a: Args) -> anyhow::Result<()> {
    match &a.cmd {
        Cmd::Keygen { key, force } => cmd::keygen::run(key, *force),
        Cmd::Sign {
            image,
            key,
            name,
            version,
            min_version,
            created,
            out,
            verity,
            no_chunks,
            chunk_size,
        } => cmd::sign::run(&cmd::sign::Sign {
            image,
            key,
            name,
            version: *version,
            min_version: *min_version,
            created: *created,
            out,
            verity: *verity,
            chunks: (!*no_chunks).then_some(*chunk_size),
        }),
        Cmd::Verify {
            image,
            keys,
            manifest,
        } => cmd::verify::run(image, keys, manifest),
        Cmd::Publish {
            image,
            manifest,
            channel,
            json,
        } => cmd::publish::run(image, manifest, channel, *json),
        Cmd::Disk {
            cmd:
                DiskCmd::Create {
                    out,
                    image,
                    manifest,
                    img_size,
                    overlay_size,
                    newimg_size,
                    size,
                    boot,
                    boot_size,
                    json,
                },
        } => cmd::disk::create(&cmd::disk::Create {
            out,
            image,
            manifest,
            img_size: img_size.as_deref(),
            overlay_size: overlay_size.as_deref(),
            newimg_size: newimg_size.as_deref(),
            size: size.as_deref(),
            boot: boot.as_deref(),
            boot_size: boot_size.as_deref(),
            json: *json,
        }),
        Cmd::Build {
            from,
            insecure,
            creds,
            out,
            format,
            compress,
            inject,
            agent,
            kernel_modules,
            modules,
            platform,
            sign,
            name,
            version,
            verity,
            json,
        } => cmd::build::run(&cmd::build::Build {
            from,
            out,
            format,
            compress: *compress,
            inject,
            agent: agent.as_deref(),
            kernel_modules: kernel_modules.as_deref(),
            modules,
            platform,
            insecure: *insecure,
            creds: creds.as_deref(),
            sign: match (sign, name, version) {
                (Some(k), Some(n), Some(v)) => Some((k.as_path(), n.as_str(), *v)),
                _ => None,
            },
            verity: *verity,
            json: *json,
        }),
        Cmd::Push {
            image,
            manifest,
            retries,
            no_delta,
            json,
        } => cmd::push::run(
            &endpoint(&a)?,
            &dial(&a)?,
            &cmd::push::Opts {
                image,
                manifest,
                retries: *retries,
                delta: !*no_delta,
                json: *json,
            },
        ),
        Cmd::Status { json } => cmd::status::run(connect(&a)?, *json),
        Cmd::Persist {
            paths,
            remove,
            run_dir,
            root,
            json,
        } => cmd::persist::run(&cmd::persist::Persist {
            paths,
            remove: *remove,
            run_dir,
            root,
            json: *json,
        }),
        Cmd::MarkGood => cmd::control::run(connect(&a)?, &Request::MarkGood),
        Cmd::Reboot => cmd::control::run(connect(&a)?, &Request::Reboot),
        Cmd::Unstage => cmd::control::run(connect(&a)?, &Request::Unstage),
        Cmd::PullNow => cmd::control::run(connect(&a)?, &Request::PullNow),
        Cmd::Cp { src, dst } => {
            let copy = cmd::cp::parse(src, dst)?;
            cmd::cp::run(connect(&a)?, copy)
        }
        Cmd::Ps { json } => cmd::ps::run(connect(&a)?, *json),
        Cmd::Attach { id } => match connect(&a) {
            Ok(c) => cmd::exec::attach_run(c, *id),
            Err(e) => {
                eprintln!("keelctl: {e:#}");
                std::process::exit(255)
            }
        },
        Cmd::Kill { id, signal } => cmd::ps::kill(connect(&a)?, *id, signal),
        Cmd::Exec {
            interactive,
            tty,
            detach,
            env,
            cwd,
            user,
            timeout,
            argv,
        } => {
            let mut vars = Vec::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--env {kv:?}: expected K=V"))?;
                vars.push((k.to_string(), v.to_string()));
            }
            if *tty && !vars.iter().any(|(k, _)| k == "TERM") {
                let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
                vars.push(("TERM".into(), term));
            }
            let spec = keel_proto::exec::ExecSpec {
                argv: argv.clone(),
                env: vars,
                cwd: cwd.clone(),
                user: user.clone(),
                timeout_secs: *timeout,
                detach: false,
                tty: tty.then(|| {
                    cmd::exec::term_size()
                        .unwrap_or(keel_proto::exec::WinSize { rows: 24, cols: 80 })
                }),
            };
            match connect(&a) {
                Ok(c) => cmd::exec::run(c, spec, *interactive, *detach),
                Err(e) => {
                    eprintln!("keelctl: {e:#}");
                    std::process::exit(255)
                }
            }
        }
        Cmd::Initramfs {
            init,
            kernel_modules,
            modules,
            keys,
            files,
            keep_compressed,
            compress,
            out,
        } => cmd::initramfs::run(
            Spec {
                init: init.clone(),
                kernel_modules: kernel_modules.clone(),
                modules: modules.clone(),
                keys: keys.clone(),
                files: Vec::new(),
                keep_compressed: *keep_compressed,
            },
            files,
            *compress,
            out,
        ),
        Cmd::WaitReady { listen, within } => {
            cmd::wait_ready::run(listen, Duration::from_secs(*within))
        }
    }
}
